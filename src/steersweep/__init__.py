"""steersweep: activation-steering sweeps (layers x alphas x prompts) on chat models.

From Python (the CLI's code path; see `steersweep.api`):

    import steersweep as ss
    run = ss.Sweep.from_config(overrides=["steering.layers=[10,14]"])
    df = run.run()
    ss.report(df).show()

The names below are imported on first use, so `import steersweep` stays cheap (no torch).
Tables and plots are written by `steersweep.reporting`; `steersweep.report(...)` is the API's front door.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Loaded, Report, Sweep, behavior_prob, compose_config, compute_vectors, load, steer, steerability
    from .vectors import VectorSet

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
    "VectorSet": "vectors",
}

__all__ = [
    "Loaded",
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
