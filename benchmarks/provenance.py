"""The benchmarks' provenance record (commit, versions, command line, machine): dyninfer.core.provenance."""

from dyninfer.core.provenance import provenance, provenance_line

__all__ = ["provenance", "provenance_line"]
