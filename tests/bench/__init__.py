"""Benchmarks: run as modules (python -m tests.bench.NAME); never collected by pytest."""
