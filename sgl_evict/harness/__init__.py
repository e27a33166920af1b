"""Eviction on HF transformers models: the quality reference for the SGLang integration."""

from sgl_evict.harness.engine import EvictionHarness, FidelityResult, GenerationResult, PrefillState
from sgl_evict.harness.models import load_gemma3_270m

__all__ = ["EvictionHarness", "FidelityResult", "GenerationResult", "PrefillState", "load_gemma3_270m"]
