"""Benchmarks and GPU scripts, run as modules from the repository root (``python -m bench.serve_bench``,
``python -m bench.gpu.throughput``); raw results in ``bench/results/``."""
