"""The on-site daemon of the edge AI appliance."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-appliance")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
