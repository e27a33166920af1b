"""Eviction inside SGLang's engine: what the hooks in ``patches/`` call, and the classes SGLang builds in its place.

| module | job |
| --- | --- |
| ``runtime`` | the scheduler process's eviction state (config, query capture, compacted view) |
| ``capture`` | post-RoPE queries: each request's last prompt window during prefill; laq's decode steps |
| ``score_plan`` | a batch's query scoring: planned once per batch, one kernel launch per layer per group |
| ``keep`` | a request's keep mask from its captured queries and the paged key pool (scores + selection) |
| ``apply`` | turns a keep mask into holes in the request's logical ``req_to_token`` row and freed slots |
| ``compact_view`` | attention's view of a batch without holes: compacted shadow rows and kept lengths |
| ``lookahead`` | laq: a request pending between prefill and eviction, its lookahead queries, its final scores |
| ``hole_radix_cache`` | SGLang's radix tree subclassed to count live slots, not tokens; SGLang's registry builds it |
| ``group_keep`` | layered pool (issue 9, ``per_layer``): per-group keep masks from all-reducible ``[G, n]`` scores |
| ``layered_allocator`` | layered pool: logical slots backed by one group-slot per layer group, the ``[G, ...]`` table |
| ``group_evict`` | layered pool: per-group keep masks applied to a row (group-slots freed, holes where none keeps) |
"""
