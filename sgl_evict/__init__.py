"""sgl-evict: token-level KV-cache eviction for SGLang."""

from sgl_evict.observation import LayerObservation
from sgl_evict.policies import POLICIES, EvictionPolicy, make_policy
from sgl_evict.selection import GRANULARITIES, Budget, KeepSet, select_keep

__version__ = "0.1.0"

__all__ = ["LayerObservation", "POLICIES", "EvictionPolicy", "make_policy", "GRANULARITIES", "Budget",
           "KeepSet", "select_keep", "__version__"]
