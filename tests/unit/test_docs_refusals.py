"""docs/plugin.md's table of refused combinations names every flag the launch checks refuse with.

Read from the source (patches/server_args.py imports SGLang, which this venv does not have): the flags of
``_UNSUPPORTED_WITH_EVICTION`` and of ``_BACKEND_FLAGS``, and every literal ``argument --FLAG`` of an error."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "patches" / "server_args.py"


def _table() -> str:
    doc = (ROOT / "docs" / "plugin.md").read_text()
    section = doc.split("### What is refused, and where", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def _constant(name: str):
    for node in ast.parse(SOURCE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is no longer a literal in {SOURCE}")


def refused_flags() -> set[str]:
    flags = {flag for flag, _, _ in _constant("_UNSUPPORTED_WITH_EVICTION")}
    flags |= {"--" + field.replace("_", "-") for field in _constant("_BACKEND_FLAGS")}
    flags |= set(re.findall(r"argument (--[a-z0-9][a-z0-9-]*)", SOURCE.read_text()))
    return flags - {"--flag"}  # a docstring's placeholder


def test_the_source_still_names_the_refusals_this_test_reads():
    assert {"--kv-cache-dtype", "--enable-hierarchical-cache", "--page-size", "--attention-backend",
            "--decode-attention-backend", "--kv-evict-layer-groups"} <= refused_flags()


def test_every_refused_flag_is_in_the_docs_table():
    table = _table()
    missing = sorted(flag for flag in refused_flags() if f"`{flag}`" not in table)
    assert not missing, f"docs/plugin.md 'What is refused, and where' lacks {missing}"
