"""Token agreement, the issue's targets (measured side by side) and the printed report."""

from __future__ import annotations

from .workload import Method

# The targets: (key, what, comparison, threshold). GPU-only ones are added when CUDA runs.
TARGETS = [
    ("grid_vs_per_setting", "grid / steering-vectors per setting (tok/s)", ">=", 4.0),
    ("grid_vs_per_cell", "grid / per-cell (tok/s)", ">=", 20.0),
    ("compute_bound_fraction", "grid / compute bound", ">=", 0.5),
    ("peak_rss_over_weights_plus_kv", "(peak RSS - runtime) / (weights + KV)", "<=", 1.5),
    ("eos_loop_vs_static", "EOS-heavy: decode loop / static batching (tok/s)", ">=", 1.5),
    ("float32_tokens_equal", "float32 tokens equal: grid, per-cell, per-setting", "==", 1.0),
]
GPU_TARGETS = [("hbm_fraction_batch1", "batch 1: weight bytes per token time / copy bandwidth", ">=", 0.6)]


def compare(a: Method, b: Method, upto: dict[int, int] | None = None) -> tuple[int, int, str]:
    """(rows equal, rows compared, first difference) over the cells both methods ran."""
    common = sorted(set(a.out) & set(b.out))
    same, first = 0, ""
    for i in common:
        k = upto.get(i) if upto else None
        x, y = a.out[i][:k], b.out[i][:k]
        if x == y:
            same += 1
        elif not first:
            pos = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
            first = f"cell {i}: {a.name} and {b.name} differ from token {pos}"
    return same, len(common), first


def agreement(methods: list[Method]) -> tuple[dict[str, str], int, int, list[str]]:
    """Pairwise agreement: ({"a==b": "same/total rows"}, rows equal in every pair, rows compared, firsts)."""
    detail, firsts = {}, []
    same_all = total_all = 0
    for k, x in enumerate(methods):
        for y in methods[k + 1 :]:
            same, total, first = compare(x, y)
            detail[f"{x.name}=={y.name}"] = f"{same}/{total} rows"
            same_all += same
            total_all += total
            if first:
                firsts.append(first)
    return detail, same_all, total_all, firsts


def evaluate(values: dict[str, float | None], cuda: bool, labels: dict[str, str] | None = None) -> list[dict]:
    """The targets with their measured values: met is None when a value could not be measured."""
    out = []
    for key, what, op, threshold in TARGETS + (GPU_TARGETS if cuda else []):
        v = values.get(key)
        met = None if v is None else (v <= threshold if op == "<=" else v >= threshold)
        out.append({"target": key, "what": (labels or {}).get(key, what), "measured": v, "op": op,
                    "threshold": threshold, "met": met})  # fmt: skip
    return out


def _fmt(t: dict, measured_text: dict[str, str]) -> str:
    if t["target"] in measured_text:
        return measured_text[t["target"]]
    v = t["measured"]
    if v is None:
        return "-"
    return f"{v:.1%}" if "fraction" in t["target"] else f"{v:.2f}"


def print_report(r: dict, methods: dict[str, dict[str, Method]]) -> None:
    """The methods' table per workload, the machine line, the targets table, profiles and notes."""
    for wname, ms in methods.items():
        print(f"\n[{wname}] {'method':<12} {'calls':>6} {'rows':>5} {'tokens':>7} {'seconds':>9} {'tok/s':>9}  impl")
        for k, m in ms.items():
            print(
                f"[{wname}] {k:<12} {m.calls:>6} {m.rows:>5} {m.tokens:>7} {m.seconds:>9.2f} {m.tok_per_s:>9.1f}  {m.impl}"
            )
    d, c, mem = r["dtype"], r["compute"], r["memory"]
    print(
        f"\ndtype: {d['used']} (auto picks {d['auto']}: {d['auto_reason'] or 'CPU bf16 flags ' + str(d['bf16_cpu_flags'])})"
        + "\nGEMM peak "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["gemm_peak_gflop_s"].items())
        + f" GFLOP/s; {c['flops_per_token'] / 1e6:.0f} MFLOP/token -> compute bound {c['compute_bound_tok_per_s']:.0f} tok/s"
    )
    print(
        f"memory: peak RSS {mem['peak_rss_gib']:.3f} GiB, runtime {mem['runtime_gib']:.3f} GiB, weights "
        f"{mem['weights_gib']:.3f} + KV {mem['kv_cache_gib']:.3f} GiB"
    )
    eos = r["eos"]
    if eos:
        print(
            f"EOS-heavy: rows made {eos['mean_new_tokens']:.1f} of at most {eos['max_new_tokens']} new tokens on "
            f"average, {eos['eos_fraction']:.0%} stopped at EOS; static batching decodes {eos['static_row_steps']} "
            f"row-steps for {eos['useful_row_steps']} useful ones (ideal speed-up {eos['ideal_speedup']:.2f}x)"
        )
    print(f"tokens equal in {d['used']}: {r['main']['tokens_equal_detail']}")
    f32 = r["float32_check"]
    print(f"tokens equal in float32 ({f32['source']}): {f32['detail']}")
    measured_text = {"float32_tokens_equal": f"{f32['rows_equal']}/{f32['rows_compared']} rows"}
    print(f"\n{'target':<52} {'measured':>12} {'threshold':>10}  met?")
    for t in r["targets"]:
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        thr = f"{t['op']} {t['threshold']:.0%}" if "fraction" in t["target"] else f"{t['op']} {t['threshold']:g}"
        if t["target"] == "float32_tokens_equal":
            thr = "all rows"
        print(f"{t['what']:<52} {_fmt(t, measured_text):>12} {thr:>10}  {met}")
    for name, p in (r.get("profile") or {}).items():
        if not p:
            continue
        print(
            f"\nprofile ({name}): one decoding step, {p['rows']} rows, {p['step_seconds_unprofiled'] * 1e3:.1f} ms unprofiled"
        )
        for op in p["top_ops"]:
            print(f"  {op['op'][:48]:<48} {op['calls']:>6} calls {op['self_ms']:>9.2f} ms {op['share']:>6.1%}")
    if r["notes"]:
        print("\nnotes:")
        for note in r["notes"]:
            print(f"  - {note}")
