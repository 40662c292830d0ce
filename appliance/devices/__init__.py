"""Device access: the local device CA, the cameras' and sensors' credentials, and the managed broker's files."""
