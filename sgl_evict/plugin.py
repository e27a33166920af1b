"""SGLang general plugin (entry point group ``sglang.srt.plugins``).

SGLang calls :func:`register` through ``sglang.srt.plugins.load_plugins`` in ``launch_server`` before it
parses arguments and again in every scheduler process; ``HookRegistry.apply_hooks`` then applies the hooks. Every
SGLang symbol the plugin wraps is one row of :func:`hook_table`; each hook module in ``patches/`` says why. The
radix tree is not hooked: :func:`register` adds SGLang's ``RadixCache`` subclassed
(:class:`sgl_evict.engine.hole_radix_cache.HoleAwareRadixCache`) to SGLang's radix-cache registry, and an evicting
server selects it (``--radix-cache-backend sgl-evict``, set by ``patches/server_args.py``).

SGLang logs and skips a hook whose target is missing, which would leave eviction half installed (a hole freed as
slot -1, say), and a subclass method whose base method was renamed would never be called. So :func:`register`
first checks the SGLang version and resolves every target and every :data:`SUBCLASSED` symbol; when one fails it
installs nothing but the flags, and a launch that asks for eviction is refused naming the symbol and the supported
SGLang version (a launch without eviction runs as plain SGLang).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass

from sgl_evict.env import env_setting

SUPPORTED_SGLANG = "0.5.17"
SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_RESULTS = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_REQ_TO_TOKEN = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool"
_RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache"
#: SGLang symbols the plugin builds on without hooking them: the radix-cache registry and ServerArgs field that
#: select a tree, and the RadixCache methods HoleAwareRadixCache overrides (a test keeps the list in step)
SUBCLASSED = (
    "sglang.srt.mem_cache.registry.register_radix_cache_backend",
    "sglang.srt.mem_cache.registry.get_radix_cache_factory",
    "sglang.srt.mem_cache.registry.default_radix_cache_factory",
    f"{SERVER_ARGS}.radix_cache_backend",
    *(f"{_RADIX}.{method}" for method in (
        "_insert_helper", "inc_lock_ref", "dec_lock_ref", "_delete_leaf", "evict", "total_size", "evictable_size",
        "protected_size", "_split_node", "match_prefix", "cache_unfinished_req")),
)

logger = logging.getLogger("sgl_evict")


@dataclass(frozen=True)
class Hook:
    """One SGLang symbol the plugin wraps: ``target`` (its dotted path), ``hook`` (``module.function`` in
    ``patches/``) and ``kind`` (``before``, ``after``, ``around`` or ``replace``, SGLang's ``HookType``)."""

    target: str
    hook: str
    kind: str


def hook_table() -> tuple[Hook, ...]:
    """Every hook of the plugin, in registration order."""
    from sgl_evict.patches import flashinfer_lse, invariant_checker, layered_backend, layered_pool, radix_cache

    alloc, paged = radix_cache.TOKEN_ALLOCATOR, radix_cache.PAGED_ALLOCATOR
    return (
        # --kv-evict-* flags and the one EvictionConfig (patches/server_args.py)
        Hook(f"{SERVER_ARGS}.add_cli_args", "server_args.add_cli_args_after", "after"),
        Hook(f"{SERVER_ARGS}.from_cli_args", "server_args.from_cli_args_around", "around"),
        # allocators with holes, and the request's radix namespace (patches/radix_cache.py)
        Hook(f"{alloc}.free", "radix_cache.token_free_before", "before"),
        Hook(f"{paged}._release_page_ids", "radix_cache.paged_release_before", "before"),
        Hook(f"{radix_cache.REQ}.__init__", "radix_cache.req_init_after", "after"),
        # the scheduler's memory check over a layered pool (patches/invariant_checker.py)
        Hook(f"{invariant_checker.CHECKER}._check_full_pool", "invariant_checker.check_full_pool_around", "around"),
        # eviction in the engine: query capture, eviction after prefill, compacted attention
        Hook(f"{_SCHEDULER}.__init__", "scheduler.init_around", "around"),
        Hook(f"{_RESULTS}.process_batch_result_prefill", "scheduler.process_batch_result_prefill_around", "around"),
        Hook(f"{_SCHEDULER}.stash_chunked_request", "scheduler.stash_chunked_request_around", "around"),
        Hook("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
             "scheduler.prepare_for_extend_after", "after"),
        Hook("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", "scheduler.add_one_req_around",
             "around"),
        Hook("sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
             "scheduler.add_chunked_req_around", "around"),
        Hook(f"{_SCHEDULER}.is_disable_overlap_for_batch", "scheduler.is_disable_overlap_for_batch_around",
             "around"),
        Hook(f"{_REQ_TO_TOKEN}.__init__", "req_to_token_pool.init_after", "after"),
        Hook(f"{_RUNNER}.forward", "model_runner.forward_around", "around"),
        Hook("sglang.srt.layers.radix_attention.RadixAttention.forward", "attention.forward_around", "around"),
        # the window queries' LSE from FlashInfer's prefill: one-read scoring (patches/flashinfer_lse.py)
        Hook(f"{flashinfer_lse.BACKEND}.forward_extend", "flashinfer_lse.forward_extend_around", "around"),
        Hook(f"{_RUNNER}.initialize", "laprox.initialize_after", "after"),
        # --kv-evict-granularity per_layer: the layered pool, its allocator and its Triton backend
        Hook(f"{layered_pool.CONFIGURATOR}._build_mha_kv_pool", "layered_pool.build_mha_kv_pool_around", "around"),
        Hook(f"{layered_pool.CONFIGURATOR}._build_token_to_kv_pool_allocator",
             "layered_pool.build_token_to_kv_pool_allocator_around", "around"),
        Hook(f"{layered_backend.BACKEND_SETUP}._build_full_attention_backend_from_str",
             "layered_backend.build_full_attention_backend_around", "around"),
        # laq: pending requests from prefill through their lookahead steps to eviction (patches/lookahead.py)
        Hook(f"{_REQ_TO_TOKEN}.free", "lookahead.req_row_free_before", "before"),
        Hook(f"{_RUNNER}.init_cuda_graphs", "lookahead.init_cuda_graphs_before", "before"),
        Hook("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
             "lookahead.can_run_graph_around", "around"),
        Hook(f"{_RESULTS}.process_batch_result_decode", "lookahead.process_batch_result_decode_around", "around"),
    )


class Unverifiable(Exception):
    """A target's module exists but does not import here (a dependency of it is missing: CUDA-only modules on a
    CPU machine); SGLang itself would fail to apply that hook the same way."""


def resolve(path: str):
    """The object at the dotted ``path`` (a module, then attributes): LookupError naming the first part that does
    not exist, :class:`Unverifiable` when its module fails to import for another reason."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):
                continue  # no such module: the rest of the path are attributes of a shorter one
            raise Unverifiable(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001  (whatever a module raises at import)
            raise Unverifiable(f"{name}: {err!r}") from None
        for i in range(cut, len(parts)):
            if not hasattr(obj, parts[i]):
                raise LookupError(".".join(parts[:i + 1]))
            obj = getattr(obj, parts[i])
        return obj
    raise LookupError(parts[0])


def unsupported(hooks: tuple[Hook, ...], version: str | None) -> str | None:
    """Why the plugin cannot run on this SGLang (another version, or a hooked symbol missing), or None.
    ``SGL_EVICT_ANY_SGLANG=1`` tries another version anyway (every symbol must still resolve). A target whose
    module does not import here (CUDA-only modules on a CPU machine) is not checked."""
    if version != SUPPORTED_SGLANG and env_setting("SGL_EVICT_ANY_SGLANG") != "1":
        return (f"sgl-evict {_own_version()} supports SGLang {SUPPORTED_SGLANG} only, this is SGLang {version} "
                "(SGL_EVICT_ANY_SGLANG=1 tries anyway)")
    for target in (*(hook.target for hook in hooks), *SUBCLASSED):
        try:
            resolve(target)
        except LookupError as err:
            return (f"SGLang {version} has no {err.args[0]} (used as {target}); sgl-evict {_own_version()} "
                    f"supports SGLang {SUPPORTED_SGLANG}")
        except Unverifiable as err:
            logger.debug("sgl-evict: target %s not checked here (%s)", target, err)
    return None


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = hook_table()
    problem = unsupported(hooks, _sglang_version())
    if problem is not None:
        from sgl_evict.patches import server_args

        logger.warning("sgl-evict: not installed: %s; a launch that asks for eviction is refused", problem)
        HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", server_args.add_cli_args_after, HookType.AFTER)
        HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", server_args.refuse_eviction(problem), HookType.AROUND)
        return
    for hook in hooks:
        module, function = hook.hook.split(".")
        fn = getattr(importlib.import_module(f"sgl_evict.patches.{module}"), function)
        HookRegistry.register(hook.target, fn, HookType[hook.kind.upper()])
    register_radix_cache()


def register_radix_cache() -> None:
    """Adds the hole-aware tree to SGLang's radix-cache registry (once a process: the registry refuses a name twice,
    and ``load_plugins`` may run again in one process)."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from sgl_evict.engine import hole_radix_cache

    if get_radix_cache_factory(hole_radix_cache.BACKEND) is None:
        register_radix_cache_backend(hole_radix_cache.BACKEND, hole_radix_cache.build)


def _sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def _own_version() -> str:
    from sgl_evict import __version__

    return __version__
