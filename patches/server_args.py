"""``--kv-evict-*`` server flags for SGLang 0.5.17.

Wraps two SGLang functions (registered through HookRegistry by :mod:`sgl_evict.plugin`):

- ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AFTER): SGLang builds its parser there, both in
  ``prepare_server_args`` (``launch_server``) and in ``sglang serve``; adding the flags after it keeps
  SGLang's own flags untouched and makes bad values fail as argparse errors (``error: argument --flag: ...``).
- ``sglang.srt.server_args.ServerArgs.from_cli_args`` (AROUND): SGLang copies only its dataclass fields
  from the parsed namespace, so the flags would be dropped; this builds the one :class:`EvictionConfig`
  (cross-flag checks such as judgeq's soft-token file) and attaches it as ``server_args._kv_evict`` (resolved
  ServerArgs are read-only except for underscore names), which travels with ``ServerArgs`` into every
  scheduler process; read it with :func:`eviction_config`. ``--kv-evict-granularity per_layer`` is checked after
  SGLang resolved its arguments (attention backend, CUDA graphs, page size, TP, the model's layers and sliding
  windows: :func:`check_per_layer_support`), where the defaults SGLang picks are known.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from sgl_evict.config import GRANULARITIES, HISTORY_RULES, POLICY_NAMES, RADIX_CACHE_BACKEND, EvictionConfig
from sgl_evict.env import env_setting
from sgl_evict.selection import Budget

FLAG_OF_FIELD = {
    "policy": "--kv-evict-policy", "budget": "--kv-evict-budget", "window": "--kv-evict-window",
    "sinks": "--kv-evict-sinks", "pooling_kernel": "--kv-evict-pooling-kernel",
    "min_prompt_len": "--kv-evict-min-prompt-len", "lookahead_steps": "--kv-evict-lookahead-steps",
    "lookahead_reserve": "--kv-evict-lookahead-reserve",
    "soft_tokens": "--kv-evict-soft-tokens", "page_granular": "--kv-evict-page-granular",
    "granularity": "--kv-evict-granularity", "layer_groups": "--kv-evict-layer-groups",
    "history": "--kv-evict-history", "host_pool_gb": "--kv-evict-host-pool-gb",
    "continuation": "--kv-evict-continuation",
}
_DEFAULTS = EvictionConfig()


def _budget(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _reserve(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != 0 and not value >= 1:
        raise argparse.ArgumentTypeError(f"0 (off) or a factor of at least 1, got {text}")
    return value


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def add_eviction_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV eviction (sgl-evict)")
    group.add_argument("--kv-evict-policy", choices=POLICY_NAMES, default="none",
                       help=f"Token-level KV eviction policy applied after prefill (the server runs "
                            f"{', '.join(POLICY_NAMES[:-1])} and {POLICY_NAMES[-1]}, one keep-set for all "
                            "layers and heads; judgeq needs --kv-evict-soft-tokens; `sgl-evict policies` "
                            "describes each).")
    group.add_argument("--kv-evict-budget", type=_budget, default=None,
                       help="KV kept per request: a fraction (0.1, 10%%) or a token count (1024).")
    group.add_argument("--kv-evict-window", type=_int_at_least(1), default=_DEFAULTS.window,
                       help="Observation window (last prompt tokens used as queries).")
    group.add_argument("--kv-evict-sinks", type=_int_at_least(0), default=_DEFAULTS.sinks,
                       help="Leading tokens always kept.")
    group.add_argument("--kv-evict-pooling-kernel", type=_int_at_least(1), default=_DEFAULTS.pooling_kernel,
                       help="Odd 1-D pooling kernel over scores.")
    group.add_argument("--kv-evict-continuation", type=_int_at_least(0), default=_DEFAULTS.continuation,
                       help="Each token also takes the best score of this many tokens before it, so that a kept "
                            "token's next tokens (a number's later digits) stay with it (0: off).")
    group.add_argument("--kv-evict-min-prompt-len", type=_int_at_least(0), default=_DEFAULTS.min_prompt_len,
                       help="Prompts shorter than this are not compressed.")
    group.add_argument("--kv-evict-lookahead-steps", type=_int_at_least(1), default=_DEFAULTS.lookahead_steps,
                       help="laq: decode steps run on the snapkv view before re-scoring (a request that ends "
                            "sooner keeps its full cache).")
    group.add_argument("--kv-evict-lookahead-reserve", type=_reserve, default=_DEFAULTS.lookahead_reserve,
                       help="laq: right after prefill, free all but the snapkv-best RESERVE x budget tokens; the "
                            "lookahead re-score chooses among them (0: hold the whole prompt until then).")
    group.add_argument("--kv-evict-soft-tokens", default=None,
                       help="judgeq: soft-token file trained for the served model (sgl-evict train-judgeq); with it, "
                            "requests of a server of another policy may also ask for judgeq.")
    group.add_argument("--kv-evict-page-granular", action="store_true",
                       help="Evict whole pages so freed memory is real (implied by --page-size > 1).")
    group.add_argument("--kv-evict-granularity", choices=GRANULARITIES, default="uniform",
                       help="uniform: one keep-set for all layers. per_layer: one keep-set per layer group in a "
                            "layered KV pool (issue 9; Triton attention, decode CUDA graphs or eager, page size "
                            "1, one GPU: needs --attention-backend triton).")
    group.add_argument("--kv-evict-layer-groups", type=_int_at_least(1), default=None,
                       help="per_layer: number of layer groups G sharing a keep-set (default: one group per layer); "
                            "must divide the model's layer count.")
    group.add_argument("--kv-evict-history", choices=HISTORY_RULES, default=_DEFAULTS.history,
                       help="A request that starts from a cached compressed prefix (a later turn): rescore the whole "
                            "history to the budget of its full length, or keep the prefix as cached and compress "
                            "only its new tokens to the budget (uniform only), or restore: rescore every token, "
                            "evicted ones from host memory, and bring back those kept (needs "
                            "--kv-evict-host-pool-gb).")
    group.add_argument("--kv-evict-host-pool-gb", type=_gib, default=_DEFAULTS.host_pool_gb,
                       help="Host memory (GiB) that keeps evicted tokens' K and V, so later turns with history "
                            "restore can bring them back (default 0: none).")


def config_from_namespace(args: argparse.Namespace) -> EvictionConfig:
    """The EvictionConfig of parsed flags; ValueError whose message starts with the bad flag."""
    values = {field: getattr(args, "kv_evict_" + field) for field in FLAG_OF_FIELD
              if hasattr(args, "kv_evict_" + field)}
    try:
        return EvictionConfig(**values)
    except ValueError as err:
        field, _, message = str(err).partition(": ")
        raise ValueError(f"argument {FLAG_OF_FIELD.get(field, field)}: {message}") from None


def add_cli_args_after(result, parser: argparse.ArgumentParser):
    """AFTER hook on ``ServerArgs.add_cli_args(parser)``."""
    add_eviction_args(parser)


#: SGLang settings the engine hooks do not handle yet: (flag, values that work, why); other values are refused
_UNSUPPORTED_WITH_EVICTION = (
    ("--speculative-algorithm", (None,), "draft and verify forwards would read the compacted rows untested"),
    ("--enable-hierarchical-cache", (False,), "the host-memory radix cache does not know about holes"),
    ("--enable-lmcache", (False,), "LMCache's radix cache does not know about holes"),
    ("--enable-flexkv", (False,), "FlexKV's radix cache does not know about holes"),
    # "sgl-evict" is RADIX_CACHE_BACKEND, written out: tests/unit/test_docs_refusals.py reads this tuple as a literal
    ("--radix-cache-backend", (None, "sgl-evict"),
     "eviction selects its own radix cache, sgl-evict: another tree would count holes as memory"),
    ("--enable-dp-attention", (False,), "not run with eviction"),
    ("--pp-size", (1,), "not run with eviction"),
)
#: KV cache dtypes: 16-bit ones (eviction verified), and FP8 ones, which the scoring kernels read (keys widened in
#: the kernel, SGLang's ``k_scale`` folded into the logit scale, ``v_scale`` into laprox's value norms); of those,
#: fp8_e4m3 on FlashInfer with page size 1 ran end to end on an H100 (evict_e2e 2026-12-07), the rest is opt-in
_KV_DTYPES_16_BIT = ("auto", "bf16", "bfloat16", "fp16", "float16")
_KV_DTYPES_FP8 = ("fp8_e4m3", "fp8_e5m2")


def check_server_support(config: EvictionConfig, args: argparse.Namespace) -> None:
    """ValueError (message starting with the flag) for settings the engine cannot evict with (yet)."""
    if config.soft_tokens:
        _check_soft_token_file(config.soft_tokens)
    if config.policy_object.uses("soft_token_queries") and (getattr(args, "page_size", None) or 1) > 1:
        # a paged pool frees whole pages, and the soft tokens' temporary slots share the prompt's last page
        raise ValueError(f"argument --page-size: --kv-evict-policy {config.policy} runs with --page-size 1 only")
    if config.enabled:
        for flag, working, why in _UNSUPPORTED_WITH_EVICTION:
            value = getattr(args, flag.lstrip("-").replace("-", "_"), working[0])
            if value not in working:
                raise ValueError(f"argument {flag}: not supported together with --kv-evict-policy yet ({why})")
    if config.enabled:
        _check_kv_cache_dtype(config, args)
    _check_host_pool(config, args)
    page_size = getattr(args, "page_size", None) or 1
    backend = getattr(args, "attention_backend", None)
    # page-granular eviction ran end to end on FlashInfer (bench/results/evict_e2e_*); other backends' paged
    # kernels read the compacted rows untested, so they stay opt-in
    if (config.enabled and page_size > 1 and backend != "flashinfer"
            and env_setting("SGL_EVICT_EXPERIMENTAL_PAGES") != "1"):
        raise ValueError(f"argument --page-size: page-granular eviction (--page-size {page_size}) is verified with "
                         f"--attention-backend flashinfer only (got {backend or 'the default'}); pass it, use "
                         "--page-size 1, or set SGL_EVICT_EXPERIMENTAL_PAGES=1 to try this backend")


def _check_host_pool(config: EvictionConfig, args: argparse.Namespace) -> None:
    """ValueError naming the flag for a host pool (``--kv-evict-host-pool-gb``) the engine cannot use: it keeps
    copies of evicted tokens for the radix tree's later turns, built for one GPU, single-token pages and the
    uniform granularity."""
    if not config.host_pool_gb:
        return
    flag = "--kv-evict-host-pool-gb"
    if not config.enabled:
        raise ValueError(f"argument {flag}: needs --kv-evict-policy")
    checks = (
        ("--page-size", (getattr(args, "page_size", None) or 1) == 1, "runs with --page-size 1 only"),
        ("--tp-size", (getattr(args, "tp_size", None) or 1) == 1, "runs on one GPU only"),
        ("--disable-radix-cache", not getattr(args, "disable_radix_cache", False),
         "later turns find evicted tokens through the radix cache"),
        ("--kv-evict-granularity", config.granularity == "uniform", "is built for uniform eviction only"),
    )
    for other, ok, why in checks:
        if not ok:
            raise ValueError(f"argument {other}: {flag} {why}")
    from sgl_evict.engine.host_kv_pool import available_host_bytes

    available = available_host_bytes()
    if config.host_pool_gb * 2**30 > available:
        raise ValueError(f"argument {flag}: {config.host_pool_gb:g} GiB asked, but this host has "
                         f"{available / 2**30:.1f} GiB of memory available")


def _check_kv_cache_dtype(config: EvictionConfig, args: argparse.Namespace) -> None:
    """ValueError naming ``--kv-cache-dtype`` for a KV dtype eviction does not run with: FP8 where a GPU run
    verified it (:data:`FP8_VERIFIED`), elsewhere only when opted in (``SGL_EVICT_UNVERIFIED_KV_DTYPE=1``), never
    with ``per_layer``; other dtypes never."""
    dtype = getattr(args, "kv_cache_dtype", None) or "auto"
    if dtype in _KV_DTYPES_16_BIT:
        return
    if dtype not in _KV_DTYPES_FP8:
        raise ValueError(f"argument --kv-cache-dtype: not supported together with --kv-evict-policy yet (the "
                         f"scoring kernels read 16-bit or FP8 keys, got {dtype})")
    if config.granularity == "per_layer":
        raise ValueError(f"argument --kv-cache-dtype: {dtype} is not built for --kv-evict-granularity per_layer "
                         "(the layered pool is 16-bit)")
    setting = (dtype, getattr(args, "attention_backend", None), getattr(args, "page_size", None) or 1)
    if setting != FP8_VERIFIED and env_setting("SGL_EVICT_UNVERIFIED_KV_DTYPE") != "1":
        raise ValueError(f"argument --kv-cache-dtype: with eviction, {FP8_VERIFIED[0]} is verified on a GPU with "
                         f"--attention-backend {FP8_VERIFIED[1]} and --page-size {FP8_VERIFIED[2]} only (got "
                         f"{dtype}, {setting[1] or 'the default backend'}, page size {setting[2]}); use those or a "
                         "16-bit KV cache, or set SGL_EVICT_UNVERIFIED_KV_DTYPE=1 to try it")


#: the FP8 setting eviction ran end to end with on an H100: (KV dtype, attention backend, page size)
FP8_VERIFIED = ("fp8_e4m3", "flashinfer", 1)


def overlap_unverified(config: EvictionConfig, args: argparse.Namespace) -> str | None:
    """What in this launch the overlap scheduler was not verified with eviction on (an H100 run of
    ``bench/gpu/evict_e2e.py``: the same keep-sets and answers as without it), or None: the scheduler then stays
    on (a user's ``--disable-overlap-schedule`` still turns it off); otherwise eviction turns it off, unless
    ``SGL_EVICT_EXPERIMENTAL_OVERLAP=1``."""
    if config.granularity == "per_layer":
        return "--kv-evict-granularity per_layer"
    if config.policy in OVERLAP_UNVERIFIED_POLICIES:
        return f"--kv-evict-policy {config.policy}"
    if config.soft_tokens:  # requests may ask for judgeq, whose soft tokens run an extra forward in the scheduler
        return "--kv-evict-soft-tokens"
    if (getattr(args, "tp_size", None) or 1) > 1:
        return f"--tp-size {args.tp_size}"
    page_size, backend = getattr(args, "page_size", None) or 1, getattr(args, "attention_backend", None)
    dtype = getattr(args, "kv_cache_dtype", None) or "auto"
    if dtype not in _KV_DTYPES_16_BIT and (dtype, backend, page_size) != FP8_VERIFIED:
        return f"--kv-cache-dtype {dtype}"
    if page_size not in OVERLAP_VERIFIED_PAGE_SIZES:
        return f"--page-size {page_size}"
    if page_size > 1 and backend != "flashinfer":  # pages verified there only
        return f"--page-size {page_size} on {backend or 'the default backend'}"
    for flag in _BACKEND_FLAGS:
        given = getattr(args, flag, None)
        if given and given not in OVERLAP_VERIFIED_BACKENDS:
            return f"--{flag.replace('_', '-')} {given}"
    if getattr(args, "model_path", None) and _has_sliding_window_layers(args):
        return "a model with sliding-window layers"
    return None


#: policies eviction has not run with the overlap scheduler on a GPU (every other one has: evict_e2e *-overlap)
OVERLAP_UNVERIFIED_POLICIES = ("judgeq", "tova", "random")
#: page sizes eviction ran with the overlap scheduler on a GPU (above 1: on FlashInfer)
OVERLAP_VERIFIED_PAGE_SIZES = (1, 16, 64)


#: attention backends eviction was verified on, end to end on an H100 (bench/results/evict_e2e_*, quality runs);
#: fa3 on models without sliding-window layers, at page size 1 and with a 16-bit KV cache (evict_e2e 2026-12-07)
VERIFIED_BACKENDS = ("flashinfer", "triton", "fa3")
#: the ones of those eviction also ran with SGLang's overlap scheduler on (fa3: evict_e2e 2026-12-07, snapkv)
OVERLAP_VERIFIED_BACKENDS = ("flashinfer", "triton", "fa3")
_BACKEND_FLAGS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def choose_attention_backend(args: argparse.Namespace) -> str | None:
    """On a GPU, eviction runs only on a verified attention backend: with none given, sets one (Triton for
    per_layer and for models with sliding-window layers, whose batches SGLang 0.5.17's FlashInfer prefill rejects;
    FlashInfer otherwise: verified with the overlap scheduler too, where SGLang's own pick on Hopper, fa3, is not)
    and returns the line to log; an explicit other backend (fa3 on a model with sliding-window layers too) is a
    ValueError naming its flag, unless ``SGL_EVICT_UNVERIFIED_BACKEND=1``. The CPU device (and others) is left
    alone."""
    if getattr(args, "device", None) not in (None, "cuda"):
        return None
    given = {flag: getattr(args, flag, None) for flag in _BACKEND_FLAGS if getattr(args, flag, None)}
    if given:
        if env_setting("SGL_EVICT_UNVERIFIED_BACKEND") == "1":
            return None
        for flag, backend in given.items():
            if backend not in VERIFIED_BACKENDS:
                raise ValueError(f"argument --{flag.replace('_', '-')}: eviction is verified with "
                                 f"{', '.join(VERIFIED_BACKENDS)} only (got {backend}); pass one of them, or "
                                 "set SGL_EVICT_UNVERIFIED_BACKEND=1 to try this backend")
            if backend == "fa3" and _has_sliding_window_layers(args):
                raise ValueError(f"argument --{flag.replace('_', '-')}: eviction on fa3 is verified on models "
                                 "without sliding-window layers only; pass triton, or set "
                                 "SGL_EVICT_UNVERIFIED_BACKEND=1 to try fa3")
        return None
    if getattr(args, "kv_evict_granularity", "uniform") == "per_layer":
        args.attention_backend, why = "triton", "the layered pool runs on Triton"
    elif _has_sliding_window_layers(args):
        args.attention_backend, why = "triton", "the model has sliding-window layers"
    else:
        args.attention_backend, why = "flashinfer", "verified with eviction and the overlap scheduler"
    return (f"kv eviction: --attention-backend {args.attention_backend} ({why}; SGLang's own default is not "
            "picked: pass --attention-backend to choose)")


def _has_sliding_window_layers(args: argparse.Namespace) -> bool:
    """Whether the model's HF config declares sliding-window attention (False when it cannot be read here)."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(
            args.model_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    except Exception:  # a hub id without network, an unknown architecture: SGLang reports those itself
        return False
    config = getattr(config, "text_config", None) or config
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ())


def check_per_layer_support(config: EvictionConfig, server_args) -> EvictionConfig:
    """ValueError (message starting with the flag) for what ``--kv-evict-granularity per_layer`` does not run with
    (Triton with full decode CUDA graphs or eager, eager prefill, page size 1, one GPU, no torch.compile;
    sliding-window models on the shared pool, not SGLang's hybrid SWA pool); the config with
    ``layer_groups`` resolved (None: one group per layer) and checked against the model's layer count when
    SGLang can read the model's config here (otherwise the pool hook checks it once the model is loaded).
    ``server_args``: SGLang's resolved ``ServerArgs``."""
    if config.granularity != "per_layer":
        return config
    flag = "--kv-evict-granularity per_layer"
    if not config.enabled:
        raise ValueError("argument --kv-evict-granularity: per_layer needs --kv-evict-policy")
    backends = set(server_args.get_attention_backends())
    if backends != {"triton"}:
        raise ValueError(f"argument --attention-backend: {flag} runs with --attention-backend triton only (got "
                         f"{', '.join(sorted(map(str, backends)))})")
    _check_per_layer_cuda_graphs(flag, server_args)
    if (server_args.page_size or 1) > 1:
        raise ValueError(f"argument --page-size: {flag} runs with --page-size 1 only (got {server_args.page_size})")
    if server_args.tp_size > 1:
        raise ValueError(f"argument --tp-size: {flag} runs on one GPU only (got --tp-size {server_args.tp_size})")
    try:
        model_config = server_args.get_model_config()
    except Exception:  # the model is read again when it is loaded; the pool hook checks the groups then
        return config
    if getattr(model_config, "is_hybrid_swa", False):
        # SWAKVPool gives sliding-window layers a slot space of their own; the layered pool replaces the one shared
        # pool (eviction turns the hybrid pool off, so only an explicit override gets here)
        raise ValueError("argument --disable-hybrid-swa-memory: --kv-evict-granularity per_layer runs sliding-window "
                         "models on the one shared KV pool only: pass --disable-hybrid-swa-memory")
    return dataclasses.replace(config, layer_groups=resolve_layer_groups(config.layer_groups,
                                                                          model_config.num_hidden_layers))


#: decode CUDA graph backends the layered Triton backend is captured with (design step 5): SGLang's full graphs
_PER_LAYER_DECODE_GRAPHS = ("full", "disabled")


def _check_per_layer_cuda_graphs(flag: str, server_args) -> None:
    """ValueError naming the flag for CUDA graphs the layered pool does not run: decode graphs other than SGLang's
    full graphs (the layered backend builds each group's read list inside the captured graph), prefill graphs
    (eviction turns them off at launch; an override that keeps one gets here), and torch.compile over the decode
    graphs (it would trace the backend's per-group Python)."""
    graphs = server_args.cuda_graph_config
    decode = str(getattr(getattr(graphs, "decode", None), "backend", "full"))
    if decode not in _PER_LAYER_DECODE_GRAPHS:
        raise ValueError(f"argument --cuda-graph-backend-decode: {flag} captures decode CUDA graphs with the full "
                         f"backend only (got {decode}): pass --cuda-graph-backend-decode full or --disable-cuda-graph")
    prefill = str(getattr(getattr(graphs, "prefill", None), "backend", "disabled"))
    if prefill != "disabled":
        raise ValueError(f"argument --cuda-graph-backend-prefill: {flag} runs prefill eagerly only (got {prefill}): "
                         "pass --cuda-graph-backend-prefill disabled")
    if getattr(server_args, "enable_torch_compile", False):
        raise ValueError(f"argument --enable-torch-compile: {flag} does not run under torch.compile")


def resolve_layer_groups(layer_groups: int | None, num_layers: int) -> int:
    """G for a model of ``num_layers`` layers (None: one group per layer); ValueError naming the flag unless
    ``1 <= G <= num_layers`` and G divides ``num_layers``."""
    groups = num_layers if layer_groups is None else layer_groups
    if not 1 <= groups <= num_layers or num_layers % groups:
        raise ValueError(f"argument --kv-evict-layer-groups: {groups} groups must divide the model's {num_layers} "
                         "layers (1 <= G <= layers)")
    return groups


def _check_soft_token_file(path: str) -> None:
    """ValueError naming the flag unless ``path`` is a soft-token file (the model's fingerprint is checked by every
    scheduler once the model is loaded)."""
    from sgl_evict.soft_tokens import SoftTokens

    try:
        SoftTokens.load(path)
    except Exception as err:  # a missing file, or any file safetensors cannot read
        raise ValueError(f"argument --kv-evict-soft-tokens: {err}") from None


def from_cli_args_around(original, cls, args: argparse.Namespace):
    """AROUND hook on the classmethod ``ServerArgs.from_cli_args(args)``."""
    try:
        config = config_from_namespace(args)
        # first: the page-size check reads the backend this picks
        chosen = choose_attention_backend(args) if config.enabled else None
        check_server_support(config, args)
    except ValueError as err:
        # argparse's own error format and exit status, no traceback.
        raise SystemExit(f"sglang serve: error: {err}") from None
    if chosen:
        logging.getLogger("sgl_evict").info(chosen)
    if config.enabled and (getattr(args, "page_size", None) or 1) > 1 and not config.page_granular:
        # a page whose tokens are only partly dropped cannot be freed: with pages, eviction is page-granular
        config = dataclasses.replace(config, page_granular=True)
        logging.getLogger("sgl_evict").info("kv eviction with --page-size %d: whole pages are evicted", args.page_size)
    if config.enabled:
        # Eviction runs while a prefill's result is processed, and the overlap scheduler launches the next forward
        # before that processing: it stays on where a GPU run verified it, and the results that evict are
        # processed first (sgl_evict.engine.overlap); elsewhere it is turned off. A prefill CUDA graph would skip
        # the Python hook that captures the window queries. SGLang's hybrid SWA pool (SWAKVPool, chosen for models
        # such as gpt-oss and Llama 4; SGLang turns it off for Gemma 2/3 itself) gives sliding-window layers slots
        # of their own, which the holes and compacted rows do not cover: eviction runs on the one pool all layers
        # share. These are turned off before SGLang resolves its arguments.
        off = ["prefill CUDA graphs", "the hybrid SWA memory pool"]
        unverified = overlap_unverified(config, args)
        if unverified and env_setting("SGL_EVICT_EXPERIMENTAL_OVERLAP") != "1":
            args.disable_overlap_schedule = True
            off.insert(0, f"overlap scheduling (not verified with {unverified})")
        args.cuda_graph_backend_prefill = "disabled"
        args.disable_hybrid_swa_memory = True
        # the radix tree that counts live slots, not tokens (sgl_evict.engine.hole_radix_cache), from SGLang's
        # radix-cache registry, where the plugin put it
        args.radix_cache_backend = RADIX_CACHE_BACKEND
        logging.getLogger("sgl_evict").info(
            "kv eviction %s (budget %s): %s turned off; radix cache: %s", config.policy, config.budget,
            ", ".join(off[:-1]) + " and " + off[-1], RADIX_CACHE_BACKEND)
    server_args = original(cls, args)
    try:
        config = check_per_layer_support(config, server_args)
    except ValueError as err:
        raise SystemExit(f"sglang serve: error: {err}") from None
    server_args._kv_evict = config
    return server_args


def refuse_eviction(problem: str):
    """The AROUND hook on ``ServerArgs.from_cli_args`` when the plugin cannot run on this SGLang
    (:func:`sgl_evict.plugin.unsupported`): a launch that asks for eviction fails naming ``problem``; one without
    eviction goes on as plain SGLang."""
    def from_cli_args(original, cls, args: argparse.Namespace):
        try:
            config = config_from_namespace(args)
        except ValueError as err:
            raise SystemExit(f"sglang serve: error: {err}") from None
        if config.enabled:
            raise SystemExit(f"sglang serve: error: argument --kv-evict-policy: sgl-evict is not installed on this "
                             f"SGLang: {problem}")
        return original(cls, args)
    return from_cli_args


def eviction_config(server_args) -> EvictionConfig:
    """The server's EvictionConfig (no eviction when the flags were never parsed)."""
    return getattr(server_args, "_kv_evict", _DEFAULTS)
