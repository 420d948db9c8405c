"""Benchmarks: ``python -m splitkv.bench merge``."""
