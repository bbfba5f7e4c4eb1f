"""The version of dyninfer (also written into every artifact)."""

__version__ = "0.2.0"
