"""Eviction policies, one small class each, registered by name in :data:`POLICIES`."""

from sgl_evict.policies.base import POLICIES, EvictionPolicy, make_policy, register
from sgl_evict.policies.baselines import NoEviction, RandomEviction, StreamingLLM
from sgl_evict.policies.dapq import PositionAwarePseudoQueries
from sgl_evict.policies.judgeq import JudgeQ
from sgl_evict.policies.laprox import OutputAwareProxy
from sgl_evict.policies.laq import LookaheadQCache
from sgl_evict.policies.snapkv import SnapKV

__all__ = [
    "POLICIES", "EvictionPolicy", "make_policy", "register",
    "NoEviction", "RandomEviction", "StreamingLLM", "SnapKV", "LookaheadQCache",
    "PositionAwarePseudoQueries", "OutputAwareProxy", "JudgeQ",
]
