"""steersweep: activation-steering sweeps (layers x alphas x prompts) on chat models.

From Python (the CLI's code path; see `steersweep.api`):

    import steersweep as ss
    run = ss.Sweep.compose(overrides=["steering.layers=[10,14]"])
    df = run.run()
    ss.report(df).show()

    with ss.steering(model, vectors, layer=14, alpha=4.0):   # your own generate, steered
        model.generate(...)

The names below are imported on first use, so `import steersweep` stays cheap (no torch).
Tables and plots are written by `steersweep.reporting`; `steersweep.report(...)` is the API's front door.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import (
        Loaded,
        Report,
        Sweep,
        behavior_prob,
        compose_config,
        compute_vectors,
        load,
        steer,
        steerability,
        steering,
    )
    from .data import DatasetError
    from .errors import SteersweepError
    from .generation import PromptError
    from .hooks import LayerLookupError
    from .loading import LoadError
    from .plan import PlanError
    from .results import ResultsError
    from .validate import ConfigError
    from .vectors import VectorError, VectorSet

_LAZY = {
    "Loaded": "api",
    "Report": "api",
    "Sweep": "api",
    "behavior_prob": "api",
    "compose_config": "api",
    "compute_vectors": "api",
    "load": "api",
    "report": "api",
    "steer": "api",
    "steerability": "api",
    "steering": "api",
    "VectorSet": "vectors",
    # exceptions: every one the package raises on purpose is a SteersweepError
    "SteersweepError": "errors",
    "ConfigError": "validate",
    "DatasetError": "data",
    "LayerLookupError": "hooks",
    "LoadError": "loading",
    "PlanError": "plan",
    "PromptError": "generation",
    "ResultsError": "results",
    "VectorError": "vectors",
}

__all__ = [
    "ConfigError",
    "DatasetError",
    "LayerLookupError",
    "LoadError",
    "Loaded",
    "PlanError",
    "PromptError",
    "ResultsError",
    "SteersweepError",
    "VectorError",
    "Report",
    "Sweep",
    "VectorSet",
    "behavior_prob",
    "compose_config",
    "compute_vectors",
    "load",
    "report",
    "steer",
    "steerability",
    "steering",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"report"})
