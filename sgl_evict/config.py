"""One eviction configuration for the SGLang plugin: server flags, per-request overrides, radix namespace."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

from sgl_evict.policies import POLICIES, EvictionPolicy, make_policy
from sgl_evict.policies.base import LOOKAHEAD, SOFT_TOKENS
from sgl_evict.selection import Budget

#: the registered policies (:data:`sgl_evict.policies.POLICIES`), in registration order
POLICY_NAMES = tuple(POLICIES)
GRANULARITIES = ("uniform", "per_layer")
#: the name SGLang's radix-cache registry knows the hole-aware tree by (``--radix-cache-backend``), which every
#: evicting server selects (sgl_evict.engine.hole_radix_cache)
RADIX_CACHE_BACKEND = "sgl-evict"
#: what a request that starts from a cached compressed prefix (a later turn) does with it: ``rescore`` the whole
#: history to the budget of its full length, ``keep`` the prefix as the radix cache holds it and spend the
#: budget on its own new tokens (docs/quality.md measures both), or ``restore``: rescore every logical token,
#: evicted ones from their copies in host memory, and bring back the kept ones (issue 25; needs a host pool)
HISTORY_RULES = ("rescore", "keep", "restore")
#: config fields the server's policy object takes, as its own option names (where the policy has that option)
POLICY_OPTIONS = {"pooling_kernel": "pooling_kernel", "lookahead_steps": "lookahead_steps",
                  "lookahead_reserve": "reserve", "continuation": "continuation",
                  "soft_tokens": "soft_tokens_path"}


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
    """What to evict and how much. Every field is validated on construction (ValueError names the field)."""

    policy: str = "none"
    budget: Budget | None = None
    window: int = 32
    sinks: int = 4
    pooling_kernel: int = 7
    min_prompt_len: int = 0
    lookahead_steps: int = 8
    #: laq: after prefill keep only the provisional best ``lookahead_reserve x budget`` tokens (0: all) for the
    #: lookahead re-score, so a pending request holds that much KV, not its whole prompt
    lookahead_reserve: float = 0.0
    soft_tokens: str | None = None
    page_granular: bool = False
    granularity: str = "uniform"
    layer_groups: int | None = None
    history: str = "rescore"
    #: host memory (GiB) for evicted tokens' K and V (``history`` ``restore``); per server, 0: none
    host_pool_gb: float = 0.0
    #: query-scoring policies: each token also takes the best combined score of this many tokens before it, so
    #: that a kept token's next tokens stay with it (``sgl_evict.selection.carry_forward``); 0: off
    continuation: int = 0

    def __post_init__(self):
        self._check_types()
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy: {self.policy!r} is not one of {', '.join(POLICY_NAMES)}")
        if POLICIES[self.policy].compresses and self.budget is None:
            raise ValueError(f"budget: policy {self.policy!r} needs a budget (a fraction such as 0.1 or a token count)")
        for name in ("window", "pooling_kernel", "lookahead_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("sinks", "min_prompt_len", "continuation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be at least 0, got {getattr(self, name)}")
        if self.lookahead_reserve != 0 and self.lookahead_reserve < 1:
            raise ValueError(f"lookahead_reserve: 0 (off) or a factor of at least 1, got {self.lookahead_reserve}")
        if self.pooling_kernel % 2 == 0:
            raise ValueError(f"pooling_kernel: must be odd, got {self.pooling_kernel}")
        if self.continuation and self.enabled and not _takes_continuation(self.policy):
            raise ValueError(f"continuation: applies to policies scored by queries, not {self.policy!r} (scored by "
                             "position)")
        if self.history not in HISTORY_RULES:
            raise ValueError(f"history: {self.history!r} is not one of {', '.join(HISTORY_RULES)}")
        self._check_restore()
        if POLICIES[self.policy].uses("soft_token_queries"):
            if not self.soft_tokens:
                raise ValueError(f"soft_tokens: policy {self.policy!r} needs a soft-token file")
            if not os.path.isfile(self.soft_tokens):
                raise ValueError(f"soft_tokens: file {self.soft_tokens!r} does not exist")
        self._check_granularity()

    def _check_types(self) -> None:
        """ValueError naming the field whose value has the wrong type (a per-request override is JSON: a string
        where a number belongs must fail that request with its reason, not raise a TypeError in the scheduler)."""
        for name in ("window", "sinks", "pooling_kernel", "min_prompt_len", "lookahead_steps", "layer_groups",
                     "continuation"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (value is None and
                                                                                    name == "layer_groups"):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
        reserve = self.lookahead_reserve
        if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or reserve != reserve:
            raise ValueError(f"lookahead_reserve: expected a number, got {reserve!r}")
        for name in ("policy", "granularity", "history"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if not isinstance(self.page_granular, bool):
            raise ValueError(f"page_granular: expected true or false, got {self.page_granular!r}")
        if self.soft_tokens is not None and not isinstance(self.soft_tokens, str):
            raise ValueError(f"soft_tokens: expected a file path, got {self.soft_tokens!r}")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ValueError(f"budget: expected a Budget, got {self.budget!r}")

    def _check_restore(self) -> None:
        """``host_pool_gb`` is a size; ``history`` ``restore`` needs one, and is built for policies scored from the
        window's queries or from positions (laq would need the evicted keys again after its lookahead steps,
        judgeq its soft tokens' forward over them) on single-token pages."""
        gb = self.host_pool_gb
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0:
            raise ValueError(f"host_pool_gb: expected a size in GiB of at least 0, got {gb!r}")
        if self.history != "restore" or not self.enabled:
            return
        if not gb:
            raise ValueError("history: 'restore' needs host memory for evicted tokens: a server started with "
                             "--kv-evict-host-pool-gb")
        policy = POLICIES[self.policy]
        if policy.query_source in (LOOKAHEAD, SOFT_TOKENS):
            raise ValueError(f"history: 'restore' is not built for policy {self.policy!r} (snapkv, dapq, laprox, "
                             "tova and the position policies only)")
        if self.page_granular:
            raise ValueError("history: 'restore' is not built for page-granular eviction")

    def _check_granularity(self) -> None:
        """``granularity`` per_layer (issue 9's layered pool, ``layer_groups`` groups; None: one per layer) needs a
        policy with a per-layer path (or none: a request of a per_layer server may turn eviction off; the server
        itself needs a policy, checked at launch); ``layer_groups`` applies to per_layer only."""
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.layer_groups is not None and self.layer_groups < 1:
            raise ValueError(f"layer_groups: must be at least 1, got {self.layer_groups}")
        if self.granularity == "uniform":
            if self.layer_groups is not None:
                raise ValueError("layer_groups: applies to granularity per_layer only")
            return
        if not POLICIES[self.policy].scores_at_prefill():
            raise ValueError(f"granularity: per_layer is not built for policy {self.policy!r} (its "
                             f"{POLICIES[self.policy].query_source} queries score after the prefill: uniform only)")
        if self.history != "rescore":
            raise ValueError(f"history: {self.history!r} is not built for granularity per_layer (rescore only)")

    @property
    def enabled(self) -> bool:
        return POLICIES[self.policy].compresses

    @functools.cached_property
    def policy_object(self) -> EvictionPolicy:
        """The policy this config runs, built once with the config's settings that are its options (the pooling
        kernel, laq's lookahead steps, judgeq's soft-token file): what the engine asks for traits and scores."""
        cls = POLICIES[self.policy]
        fields = getattr(cls, "__dataclass_fields__", {})
        options = {option: getattr(self, name) for name, option in POLICY_OPTIONS.items() if option in fields}
        return make_policy(self.policy, **options)

    def fingerprint(self) -> str | None:
        """Radix-cache namespace of KV compressed under this config; None when nothing is evicted.

        Everything that changes which tokens are kept is part of it, so two configs share cached KV
        only when they would have produced the same holes.
        """
        if not self.enabled:
            return None
        # judgeq's keep-set depends on the soft tokens' content: a file rewritten in place is another namespace
        policy = POLICIES[self.policy]
        soft = soft_token_file_id(self.soft_tokens) if policy.uses("soft_token_queries") else ""
        parts = [self.policy, repr(self.budget), self.window, self.sinks, self.pooling_kernel,
                 self.lookahead_steps if policy.query_source == LOOKAHEAD else 0, soft, self.page_granular]
        if self.granularity != "uniform":  # uniform keeps the fingerprints it always had
            parts += [self.granularity, self.layer_groups]
        if self.history != "rescore":  # likewise
            parts.append(f"history={self.history}")
        if self.lookahead_reserve and policy.query_source == LOOKAHEAD:  # likewise
            parts.append(f"reserve={float(self.lookahead_reserve):g}")
        if self.continuation:  # likewise
            parts.append(f"continuation={self.continuation}")
        return "kv_evict:" + hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]

    def override(self, request_params: dict | None) -> "EvictionConfig":
        """This config with a request's ``custom_params["kv_evict"]`` applied (validated the same way)."""
        if not request_params or "kv_evict" not in request_params:
            return self
        raw = request_params["kv_evict"]
        if not isinstance(raw, dict):
            raise ValueError(f"kv_evict: expected an object such as {{'policy': 'snapkv', 'budget': 0.2}}, got {raw!r}")
        for name in ("granularity", "layer_groups", "page_granular", "host_pool_gb"):
            # the KV pool's layout is per server; a paged pool frees whole pages only (holes mid-page would leak)
            if name in raw and raw[name] != getattr(self, name):
                raise ValueError(f"{name}: set by the server (--kv-evict-{name.replace('_', '-')}): the KV pool's "
                                 "layout is per server, not per request")
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"kv_evict: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values = dict(raw)
        asked = values.get("policy")
        if "continuation" not in raw and isinstance(asked, str) and asked in POLICIES and \
                not _takes_continuation(asked):
            values["continuation"] = 0  # the server's continuation does not apply to a position policy it asks for
        if "budget" in values and values["budget"] is not None:
            try:
                values["budget"] = Budget.parse(values["budget"])
            except ValueError as err:
                raise ValueError(f"budget: {err}") from None
        return dataclasses.replace(self, **values)


def _takes_continuation(policy: str) -> bool:
    """Whether registered policy ``policy`` selects with a continuation (the query-scoring ones)."""
    return "continuation" in getattr(POLICIES[policy], "__dataclass_fields__", {})


def soft_token_file_id(path: str) -> str:
    """A digest of a soft-token file's bytes (read once per path, size and modification time: radix namespaces are
    computed for every request)."""
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime_ns: part of the cache key only
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
