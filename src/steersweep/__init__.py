"""steersweep: activation-steering sweeps (layers x alphas x prompts) on chat models.

From Python (the CLI's code path; see `steersweep.api`):

    import steersweep as ss
    run = ss.Sweep.compose(overrides=["steering.layers=[10,14]"])
    df = run.run()
    ss.report(df).show()

    with ss.steering(model, vectors, layer=14, alpha=4.0):   # your own generate, steered
        model.generate(...)

The API's names are imported on first use, so `import steersweep` stays cheap (no torch); the
exceptions are imported at once (`steersweep.core.errors`, no torch). The package's stages, in the
order data flows: core, inputs, steering, model, runs, scoring, report, pipeline; api sits on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steersweep.core.errors import (
    ConfigError,
    DatasetError,
    LayerLookupError,
    LoadError,
    PlanError,
    PromptError,
    ResultsError,
    SteersweepError,
    VectorError,
)

if TYPE_CHECKING:
    from steersweep.api.compose import Loaded, compose_config, load
    from steersweep.api.report import Report, report
    from steersweep.api.scores import behavior_prob, steerability
    from steersweep.api.steer import compute_vectors, steer, steering
    from steersweep.api.sweep import Sweep
    from steersweep.vectors.vectorset import VectorSet

# the public API, imported on first use (these import torch)
_LAZY = {
    "Loaded": "api.compose",
    "compose_config": "api.compose",
    "load": "api.compose",
    "Report": "api.report",
    "report": "api.report",
    "Sweep": "api.sweep",
    "behavior_prob": "api.scores",
    "steerability": "api.scores",
    "compute_vectors": "api.steer",
    "steer": "api.steer",
    "steering": "api.steer",
    "VectorSet": "steering.vectorset",
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
