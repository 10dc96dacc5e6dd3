"""Bundled reference models and data sets used by lrcc's tests and benchmarks."""
