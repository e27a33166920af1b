"""SGLang general plugin (entry point group ``sglang.srt.plugins``).

SGLang calls :func:`register` through ``sglang.srt.plugins.load_plugins`` in ``launch_server`` before it
parses arguments and again in every scheduler process; the hooks below are then applied by
``HookRegistry.apply_hooks``. Each hook module in ``patches/`` names the SGLang function it wraps and why.
"""

from __future__ import annotations

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sgl_evict.patches import server_args

    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", server_args.add_cli_args_after, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", server_args.from_cli_args_around, HookType.AROUND)
