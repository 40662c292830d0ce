"""Keys and X.509 certificates: the one place the project makes, reads and checks them (``cryptography``)."""
