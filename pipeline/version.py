"""The package's version, in a module of its own so the library records it without loading the public API."""

__version__ = "0.1.0"
