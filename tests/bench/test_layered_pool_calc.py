"""bench/layered_pool_calc.py: the numbers docs/design.md quotes for issue 9 (CPU, no torch)."""


from bench.layered_pool_calc import (
    GIB,
    KIB,
    LLAMA_31_8B,
    MIB,
    budget_tokens,
    linear_split,
    main,
    mapping_bytes,
    report,
    union_tokens,
)


def test_llama_bytes_per_token():
    assert LLAMA_31_8B.bytes_per_token_layer() == 4096  # 2 (K, V) x 8 heads x 128 x 2 bytes
    assert LLAMA_31_8B.bytes_per_token() == 128 * KIB
    assert 32768 * LLAMA_31_8B.bytes_per_token() == 4 * GIB


def test_budget_rounds_like_the_selector():
    assert budget_tokens(0.1, 32768) == 3277
    assert budget_tokens(0.1, 5) == 1 and budget_tokens(1.0, 7) == 7


def test_linear_split_mean_and_ends():
    f = linear_split(32, 0.18, 0.02)
    assert f[0] == 0.18 and abs(f[-1] - 0.02) < 1e-12
    assert abs(sum(f) / 32 - 0.1) < 1e-12


def test_union_bounds():
    u = union_tokens([10, 10], prompt=100, protected=4)
    assert u["nested"] == 10 and u["disjoint"] == 16
    assert u["nested"] <= u["independent"] <= u["disjoint"]
    assert union_tokens([100, 100], 100, 4)["independent"] == 100


def test_per_layer_sets_free_nothing_today_but_the_same_as_uniform_when_layered():
    r = report(LLAMA_31_8B, 32768, [0.1] * 32, protected=36)
    uniform = 3277 * LLAMA_31_8B.bytes_per_token()
    assert r["layered"] == uniform  # equal total memory
    assert r["today_nested"] == uniform  # only if every layer kept the same tokens
    assert r["today_disjoint"] == r["full"]  # 32 x 10% > 100%: nothing freed
    assert r["today_independent"] > 0.95 * r["full"]


def test_pyramid_today_needs_at_least_the_largest_layer():
    r = report(LLAMA_31_8B, 32768, linear_split(32, 0.18, 0.02), protected=36)
    assert r["today_nested"] == budget_tokens(0.18, 32768) * LLAMA_31_8B.bytes_per_token()
    assert abs(r["layered"] / (3277 * LLAMA_31_8B.bytes_per_token()) - 1) < 1e-3


def test_mapping_bytes():
    assert mapping_bytes(32768, 32) == 4 * MIB  # int32 per logical token per layer
    assert mapping_bytes(32768, 32, page_size=16) == 256 * KIB
    assert mapping_bytes(17, 1, page_size=16) == 8  # pages round up


def test_main_prints_the_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "4096 B per token per layer" in out and "409.6 MiB" in out and "737.4 MiB" in out
