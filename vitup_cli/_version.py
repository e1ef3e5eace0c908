"""vitup's version, in a module of its own so that every module can read it without importing the package's
public face (``vitup_cli/__init__.py``, which imports the whole stack)."""

__version__ = "0.1.0"
