"""The one place the dra-core version is set; the backends and `dra-core --version` read it."""

__version__ = "0.1.0"
