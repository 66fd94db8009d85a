"""The package version (a module of its own, so that any module can import it without
importing the package root, which re-exports everything)."""

__version__ = "0.1.0"
