"""The version of gaman_sync (a leaf: setup.cfg and the CLI read it)."""

__version__ = "0.2.0"
