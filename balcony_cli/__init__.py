"""Balcony: add trained early exits to a frozen decoder-only language model."""

from __future__ import annotations

__version__ = "0.1.0"


def _register_harness_model() -> None:
    """Register the `balcony` model in lm-evaluation-harness's registry, as a lazy import path.

    The harness fills its registry with its own models (hf, vllm, ...) only when it finds the registry
    empty, so lm_eval.models is imported first: registering into the empty registry would hide them.
    """
    try:
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return
    if "balcony" not in model_registry:
        model_registry.register("balcony", target="balcony_cli.harness:BalconyLM")


_register_harness_model()
