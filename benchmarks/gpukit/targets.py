"""The issue's targets, read from the checks' results: {"measured", "threshold", "met"} each.

A target whose check failed, timed out or was skipped is reported with measured None and met False,
never left out: the JSON always lists every target.
"""

from __future__ import annotations

from collections.abc import Callable

# name -> (check, how to read the measured value from its result, threshold, "min" (>=) or "max" (<=))
TARGETS: dict[str, tuple[str, Callable[[dict], float], float, str]] = {
    "8b_batch1_fraction_of_hbm_bound": (
        "throughput",
        lambda r: r["batch1"]["fraction_of_bandwidth_bound"],
        0.60,
        "min",
    ),
    "8b_grid96_fraction_of_bound": ("throughput", lambda r: r["grid_fraction_of_bound"], 0.50, "min"),
    "8b_grid96_vs_steering_vectors_per_setting": ("throughput", lambda r: r["grid_vs_per_setting"], 10.0, "min"),
    "8b_grid96_vs_unsteered_hf_generate": ("throughput", lambda r: r["grid_vs_hf_generate"], 0.70, "min"),
    "70b_spill_grid256_vs_batch1_tok_s": ("spill70b", lambda r: r["speedup_largest_vs_batch1"], 100.0, "min"),
    "70b_spill_peak_gpu_over_planned": (
        "spill70b",
        lambda r: max(g["peak_gpu_bytes"] / g["predicted_peak_gpu_bytes"] for g in r["grids"]),
        1.0,
        "max",
    ),
    "float32_split_rows_unequal": ("split", lambda r: r["split"]["rows"] - r["split"]["equal_rows"], 0, "max"),
}


def evaluate(steps: dict[str, dict]) -> dict[str, dict]:
    """Every target with what its check measured; `steps` maps a check to its step record."""
    out = {}
    for name, (check, read, threshold, kind) in TARGETS.items():
        result = steps.get(check, {}).get("result")
        try:
            measured = float(read(result)) if result is not None else None
        except (KeyError, TypeError, ZeroDivisionError, ValueError):
            measured = None
        met = measured is not None and (measured >= threshold if kind == "min" else measured <= threshold)
        out[name] = {"measured": measured, "threshold": threshold, "met": met, "check": check,
                     "direction": ">=" if kind == "min" else "<="}  # fmt: skip
    return out
