"""A later turn that restores evicted tokens prefills its prompt's last token after the restore
(issue 25).

The answer's first token comes from the prefill's last logits, and those see the previous turns'
keep-sets, not what the restore after the prefill brings back. On the HF harness
(``bench/reversible_probe.py``, mode ``reversible-carry-rerun``; 10% of 8K, held-out seed) running
the prompt's last token again over the restored keep-set answered 175 of 180 later turns with
laprox (165 with snapkv) where the prefill's first token answered 168 (156).

The server gets the same from SGLang's chunked prefill: the scheduler's last chunk of such a request
stops one token short (:func:`cut`, from the ``PrefillAdder`` hooks in ``patches/scheduler.py``);
eviction and restore run after that chunk, scored by its window queries, and the last token's chunk
runs alone over the restored keep-set, its logits sampled by SGLang as any prefill's.
"""

from __future__ import annotations

#: ``Req`` attribute: the logical length the request is evicted at once its last chunk was cut (its
#: prompt's length less one); None otherwise
EVICT_AT = "_sgl_evict_evict_at"


def wants_cut(req, tree, state) -> bool:
    """Whether ``req``'s next prefill chunk, set (``req.extend_range``) to run to the prompt's end,
    should stop one token short: eviction on with ``history`` ``restore``, a reversible ``tree``
    (None: none), at least two tokens left to prefill and host copies in its matched prefix
    (something a restore could bring back)."""
    if tree is None or not state.enabled:
        return False
    config = state.config_of(req)
    if not config.enabled or config.history != "restore":
        return False
    if req.extend_range.end != len(req.full_untruncated_fill_ids) or req.extend_range.length < 2:
        return False
    host = tree.host_slots_of_prefix(req)
    return host is not None and bool((host >= 0).any())


def cut(req) -> None:
    """Stops ``req``'s chunk one token short of its end and records where it is evicted."""
    start, end = req.extend_range.start, req.extend_range.end
    req.set_extend_range(start, end - 1)
    setattr(req, EVICT_AT, end - 1)


def forget_cut(req) -> None:
    """Drops a cut recorded earlier (done, or its request retracted before its last token ran)."""
    setattr(req, EVICT_AT, None)


def evict_at(req) -> int | None:
    """The logical length ``req`` is evicted at after a cut, or None."""
    return getattr(req, EVICT_AT, None)


def last_token_chunk(req) -> bool:
    """Whether ``req``'s chunk (``req.extend_range``) is the last token's own, after a cut."""
    at = evict_at(req)
    return at is not None and req.extend_range.start >= at
