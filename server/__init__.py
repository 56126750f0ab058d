"""clora-serve: the HTTP server, its engine and the request pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clora-serve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+source"
