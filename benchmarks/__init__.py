"""Benchmarks behind docs/results.md; each runs as ``python -m benchmarks.<name> --help``."""
