"""The quality suite: seeded single- and multi-turn tasks sent to a running SGLang server, scored against the full
cache with intervals (``sgl-evict quality``; docs/quality.md)."""
