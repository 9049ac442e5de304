"""Benchmarks: one module per family (``python -m triformers.benchmarks.<family>``) on a shared harness.

Nothing runs on import.
"""
