"""Scripts for the offline GPU host (docs/gpu.md): install, smoke test, end-to-end checks, benchmarks."""
