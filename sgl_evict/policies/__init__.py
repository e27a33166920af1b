"""Eviction policies, one small class each, registered by name in :data:`POLICIES`.

The registry: importing a policy's module here registers it for the harness, the CLI and the server alike. The
order of these imports is the order users see the names in (CLI choices, ``sgl-evict eval``'s default policies).
"""

from sgl_evict.policies.base import POLICIES, EvictionPolicy, make_policy, policy_class, register
from sgl_evict.policies.snapkv import SnapKV  # isort: skip
from sgl_evict.policies.laq import LookaheadQCache  # isort: skip
from sgl_evict.policies.dapq import PositionAwarePseudoQueries  # isort: skip
from sgl_evict.policies.laprox import OutputAwareProxy  # isort: skip
from sgl_evict.policies.judgeq import JudgeQ  # isort: skip
from sgl_evict.policies.tova import TOVA  # isort: skip
from sgl_evict.policies.baselines import NoEviction, RandomEviction, StreamingLLM  # isort: skip

__all__ = [
    "POLICIES", "EvictionPolicy", "make_policy", "policy_class", "register",
    "NoEviction", "RandomEviction", "StreamingLLM", "SnapKV", "LookaheadQCache",
    "PositionAwarePseudoQueries", "OutputAwareProxy", "JudgeQ", "TOVA",
]
