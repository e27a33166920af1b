"""What every plot of bench/ does around its own drawing: pyplot on a file-only backend, and the figure titled,
laid out and written."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: CI and the GPU host have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, title: str, dpi: int) -> None:
    """Titles ``fig``, lays it out, writes it to ``path`` (making its folder) and closes it."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
