"""Each request's holes counted on the host, so a decode forward's kept lengths need no read from the device.

SGLang's attention backends want a batch's lengths on the host too (FlashInfer plans from host offsets, a CUDA graph
replay takes ``seq_lens_cpu``), and the compacted view's lengths are the live entries of each row: counting them on
the device and reading them back is a host sync per forward, which under the overlap scheduler waits for the
forward before. A request's holes change only where the scheduler already waits for the device (a prefill's result,
laq's last lookahead step), so they are counted there, once, and a decode step's kept length is its logical length
less its holes and less the live positions a pending laq request hides (decode tokens are never evicted). A request
with no count (its prefill's result not processed yet) sends its batch down the counting path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sgl_evict.holes import HOLE


def count_holes(req_to_token: torch.Tensor, rows: list[int], lengths: list[int]) -> list[int]:
    """Holes among the first ``lengths[i]`` entries of ``req_to_token`` row ``rows[i]``, for every ``i``, in one read
    from the device."""
    if not rows:
        return []
    width = max(lengths)
    table = req_to_token[torch.tensor(rows, device=req_to_token.device), :width]
    inside = torch.arange(width, device=table.device) < torch.tensor(lengths, device=table.device).view(-1, 1)
    return ((table == HOLE) & inside).sum(dim=1).tolist()


class HoleCounts:
    """Request id -> holes in its row (logical entries attention skips), as last counted."""

    def __init__(self):
        self._holes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._holes)

    def recount(self, reqs: Iterable, req_to_token: torch.Tensor, lengths: Iterable[int]) -> None:
        """Counts the holes of SGLang's ``reqs`` among their rows' first ``lengths`` entries (positions past those
        are decode tokens, never holes)."""
        reqs, lengths = list(reqs), [int(n) for n in lengths]
        counted = count_holes(req_to_token, [req.req_pool_idx for req in reqs], lengths)
        self._holes.update((req.rid, holes) for req, holes in zip(reqs, counted))

    def forget(self, rid: str) -> None:
        """The request left (its row was freed); a retracted one is counted again after its next prefill."""
        self._holes.pop(rid, None)

    def kept_lengths(self, rids: list[str] | None, seq_lens: list[int],
                     hidden: Mapping[str, int]) -> list[int] | None:
        """Kept lengths of a decode batch (``rids`` and logical ``seq_lens`` in batch order; ``hidden``: live
        positions each pending laq request hides), or None when a request of it has no count."""
        if not rids:
            return None
        holes = [self._holes.get(rid) for rid in rids]
        if None in holes:
            return None
        return [n - h - hidden.get(rid, 0) for rid, n, h in zip(rids, seq_lens, holes)]
