"""The package version (one place; read by the package and by the feature cache's keys)."""

__version__ = "0.1.0"
