"""Extraction methods, injection modes, steered positions and the next-token KL (issue 13).

References are written here plainly, one item at a time (numpy / scikit-learn, a hook of the test's
own), never through the function under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from omegaconf import OmegaConf

from steersweep.core import errors
from steersweep.core.config import GenerationConfig
from steersweep.generation.decode import generate_rows
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import MODES, RowDelta, row_deltas, steer
from steersweep.hooks.trunk import record
from steersweep.inputs.datasets import load_behavior_items, load_pairs
from steersweep.inputs.encoding import pad_id_of
from steersweep.scoring.behavior import behavior_probs, encode_behavior_items
from steersweep.scoring.metrics import next_token_kl
from steersweep.vectors import directions, vectorset

MODE_ROWS = ["add", "ablate", "ablate_add", "norm_preserving"]


def layer_out(model, ids, layer, rows=None, positions="all"):
    """Output of `layer` (record registers after steer, so it sees the steered state)."""
    with steer(model, row_deltas(rows, positions) if rows else {}):
        with record(model, [layer]) as store:
            model(input_ids=ids)
    return store[layer][0].clone()


def plain_mode(h: torch.Tensor, v: torch.Tensor, alpha: float, mode: str) -> torch.Tensor:
    """The four modes, written out independently of hooks/rows.py."""
    if alpha == 0:
        return h
    u = v / v.norm()
    ablated = h - (h @ u)[..., None] * u
    if mode == "add":
        return h + alpha * v
    if mode == "ablate":
        return ablated
    if mode == "ablate_add":
        return ablated + alpha * v
    added = h + alpha * v
    return added * (h.norm(dim=-1, keepdim=True) / added.norm(dim=-1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# Exact identities of the modes


def test_ablate_leaves_no_component_along_u(tiny):
    ids = torch.randint(3, 1000, (2, 7))
    v = torch.randn(32) * 3
    u = v / v.norm()
    base = layer_out(tiny, ids, 1)
    out = layer_out(tiny, ids, 1, [(1, 2.0, v, "ablate")] * 2)
    assert (base @ u).abs().max() > 1e-2  # there was something to remove
    assert (out @ u).abs().max() <= 1e-6 * base.norm(dim=-1).max()
    torch.testing.assert_close(out, base - (base @ u)[..., None] * u, rtol=0, atol=1e-5)
    # alpha only switches ablation on: any non-zero alpha removes the whole component
    assert torch.equal(layer_out(tiny, ids, 1, [(1, -7.0, v, "ablate")] * 2), out)


def test_norm_preserving_keeps_each_position_norm(tiny):
    ids = torch.randint(3, 1000, (2, 7))
    v = torch.randn(32) * 3
    base = layer_out(tiny, ids, 2)
    out = layer_out(tiny, ids, 2, [(2, 3.0, v, "norm_preserving")] * 2)
    torch.testing.assert_close(out.norm(dim=-1), base.norm(dim=-1), rtol=1e-6, atol=0)
    cos = torch.nn.functional.cosine_similarity(out, base + 3.0 * v, dim=-1)
    assert (cos > 1 - 1e-6).all()  # the direction of h + alpha v
    assert (out - base).abs().max() > 0.1


def test_ablate_add_equals_ablate_then_add(tiny):
    ids = torch.randint(3, 1000, (2, 6))
    v = torch.randn(32)
    ablated = layer_out(tiny, ids, 1, [(1, 1.0, v, "ablate")] * 2)
    both = layer_out(tiny, ids, 1, [(1, 2.5, v, "ablate_add")] * 2)
    assert torch.equal(both, ablated + 2.5 * v)


@pytest.mark.parametrize("mode", MODES)
def test_alpha_zero_is_unsteered_in_every_mode(tiny, mode):
    ids = torch.randint(3, 1000, (2, 6))
    assert torch.equal(layer_out(tiny, ids, 1, [(1, 0.0, torch.randn(32), mode)] * 2), layer_out(tiny, ids, 1))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="use one of add, ablate, ablate_add, norm_preserving"):
        row_deltas([(1, 1.0, torch.randn(4), "subtract")])


def test_mixed_modes_and_layers_in_one_batch_equal_single_rows(tiny):
    ids = torch.randint(3, 1000, (5, 6))
    v1, v2 = torch.randn(32), torch.randn(32)
    rows = [(1, 2.0, v1, "add"), (2, 1.0, v2, "ablate"), (1, -1.5, v1, "ablate_add"),
            (2, 3.0, v2, "norm_preserving"), (1, 0.0, v1, "ablate")]  # fmt: skip
    with steer(tiny, row_deltas(rows)):
        batched = tiny(input_ids=ids).logits
    plain = tiny(input_ids=ids).logits
    for b, row in enumerate(rows):
        with steer(tiny, row_deltas([row])):
            single = tiny(input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-5)
        # and each mode really is its formula at its layer (a hand-made hook on the plain model)
        layer, alpha, v, mode = row

        def hook(module, args, out, alpha=alpha, v=v, mode=mode):  # noqa: ARG001
            return plain_mode(out, v, alpha, mode)

        handle = get_layers(tiny)[layer].register_forward_hook(hook)
        try:
            ref = tiny(input_ids=ids[b : b + 1]).logits
        finally:
            handle.remove()
        torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-4)
        if alpha != 0:
            assert (single - plain[b : b + 1]).abs().max() > 1e-3


def test_row_delta_keep_follows_every_row_state():
    """The decode loop drops finished rows: modes, directions, norms flags and lengths follow."""
    torch.manual_seed(0)
    v, w = torch.randn(8), torch.randn(8)
    rows = [(1, 2.0, v, "add"), (1, 1.0, w, "ablate"), (1, -1.0, v, "ablate_add"), (1, 3.0, w, "norm_preserving")]
    lengths = [5, 4, 2, 3]
    full = row_deltas(rows, "from:3", lengths)[1]
    kept = row_deltas(rows, "from:3", lengths)[1]
    h = torch.randn(4, 5, 8)
    assert torch.equal(full.apply(h), kept.apply(h))  # prefill: caches filled before keep
    steps = [torch.randn(4, 1, 8) for _ in range(3)]
    assert torch.equal(full.apply(steps[0]), kept.apply(steps[0]))
    keep = torch.tensor([3, 1, 2])
    kept.keep(keep)
    for s in steps[1:]:
        want = full.apply(s)[keep]
        assert torch.equal(kept.apply(s[keep]), want)
    assert kept.rows == 3


# ---------------------------------------------------------------------------------------------
# Steered positions


def changed(rd: RowDelta, h: torch.Tensor) -> list[list[int]]:
    out = rd.apply(h)
    return [[int(x) for x in row] for row in (out != h).any(-1)]


@pytest.mark.parametrize(
    "positions, prefill, step",
    [
        ("all", [[1] * 6, [1] * 6], [[1], [1]]),
        ("prompt", [[1] * 6, [1] * 6], [[0], [0]]),
        ("generated", [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]], [[1], [1]]),
        # row 1 is left-padded by 3: its token 2 sits in column 5; after the prefill, token 6 / 3
        ("from:2", [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], [[1], [1]]),
        ("from:4", [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], [[1], [0]]),
    ],
)
def test_positions_steer_the_right_tokens(positions, prefill, step):
    rd = row_deltas([(0, 1.0, torch.ones(4)), (0, 1.0, torch.ones(4))], positions, lengths=[6, 3])[0]
    assert changed(rd, torch.randn(2, 6, 4)) == prefill
    assert changed(rd, torch.randn(2, 1, 4)) == step
    if positions == "from:4":  # row 1 reaches token 4 at its second generated token
        assert changed(rd, torch.randn(2, 1, 4)) == [[1], [1]]


def test_from_k_needs_lengths_and_bad_positions_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        row_deltas([(0, 1.0, torch.ones(4))], "from:2")
    with pytest.raises(ValueError, match="use all, prompt, generated or from:K"):
        row_deltas([(0, 1.0, torch.ones(4))], "from:-1", lengths=[3])


def reference_greedy(model, prompt, layer, v, alpha, mode, positions, steps, eos=2):
    """Greedy tokens of one row, recomputing the whole sequence each step, steering by hand."""
    ids = list(prompt)
    n = len(prompt)
    for _ in range(steps):
        t = len(ids)
        if positions == "all":
            sel = list(range(t))
        elif positions == "prompt":
            sel = list(range(n))
        elif positions == "generated":
            sel = list(range(n - 1, t))
        else:
            sel = list(range(int(positions.split(":")[1]), t))

        def hook(module, args, out, sel=sel):  # noqa: ARG001
            out = out.clone()
            out[:, sel] = plain_mode(out[:, sel], v, alpha, mode)
            return out

        handle = get_layers(model)[layer].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                tok = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        finally:
            handle.remove()
        if tok == eos:
            break
        ids.append(tok)
    return ids[n:]


@pytest.mark.parametrize("positions", ["prompt", "from:3", "generated"])
def test_generation_steers_positions_as_a_full_recompute_does(tiny, tokenizer, positions):
    """KV-cache generation of a mixed batch (prompt lengths, modes) == per-row full recompute."""
    prompts = ["Tell me about your weekend.", "Hi", "What is a good breakfast today, do you think?"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    v = torch.randn(32) * 3
    rows = [(1, 2.0, v, m) for m in MODE_ROWS[:3]]
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=6))
    out = generate_rows(tiny, tokenizer, ids, rows, gen, positions=positions)
    for p, row, comp in zip(ids, rows, out, strict=True):
        assert comp.token_ids == reference_greedy(tiny, p, 1, v, 2.0, row[3], positions, 6), (positions, row[3])
    plain = generate_rows(tiny, tokenizer, ids, [(1, 0.0, v)] * 3, gen)
    assert [c.token_ids for c in out] != [c.token_ids for c in plain]  # the steering did something


def test_mixed_modes_generate_like_single_rows(tiny, tokenizer):
    prompts = ["Tell me about your weekend.", "Hi"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    vec = {1: torch.randn(32) * 2, 2: torch.randn(32) * 2}
    rows = [(layer, 2.0, vec[layer], m) for layer in (1, 2) for m in MODE_ROWS] + [(1, 0.0, vec[1], "ablate")]
    cells = [(i, r) for i in range(len(ids)) for r in rows]
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=8))
    for positions in ("all", "from:2"):
        batch = generate_rows(tiny, tokenizer, [ids[i] for i, _ in cells], [r for _, r in cells], gen,
                              positions=positions)  # fmt: skip
        for (i, r), comp in zip(cells, batch, strict=True):
            single = generate_rows(tiny, tokenizer, [ids[i]], [r], gen, positions=positions)[0]
            assert comp.token_ids == single.token_ids, (positions, i, r[0], r[1], r[3])
        assert len({tuple(c.token_ids) for c in batch}) > len(prompts)


def test_rows_leaving_the_decode_loop_keep_their_modes(tiny, tokenizer, monkeypatch):
    """Rows stop at scattered steps (one token in 12 ends a row), so finished rows leave the batch
    (`RowDelta.keep`): every row, whatever its mode, layer and start token, equals its single run."""
    kept: list[int] = []
    real_keep = RowDelta.keep

    def spy(self, rows):  # the real keep, counted
        kept.append(len(rows))
        real_keep(self, rows)

    monkeypatch.setattr(RowDelta, "keep", spy)
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(1, tiny.config.vocab_size, 12)]
    prompts = ["Tell me about your weekend.", "Hi", "What is a good breakfast today, do you think?"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    vec = {1: torch.randn(32) * 2, 3: torch.randn(32) * 2}
    rows = [(layer, 2.0, vec[layer], m) for layer in (1, 3) for m in MODE_ROWS]
    cells = [(i, r) for i in range(len(ids)) for r in rows]
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=16))
    batch = generate_rows(tiny, tokenizer, [ids[i] for i, _ in cells], [r for _, r in cells], gen, positions="from:2")
    stops = [c.n_new_tokens for c in batch if c.stop_reason == "eos"]
    assert len(set(stops)) > 2 and len(stops) < len(cells)  # rows really left at different steps
    assert kept and min(kept) < len(cells)  # and the steering state followed them out
    for (i, r), comp in zip(cells, batch, strict=True):
        single = generate_rows(tiny, tokenizer, [ids[i]], [r], gen, positions="from:2")[0]
        assert (comp.token_ids, comp.stop_reason) == (single.token_ids, single.stop_reason), (i, r[0], r[3])


# ---------------------------------------------------------------------------------------------
# Extraction methods against scikit-learn


PAIRS = load_pairs("sentiment_pairs")[:10]


def independent_activations(model, tokenizer, texts, layer):
    rows = []
    for t in texts:  # one at a time, unpadded; hidden_states[L + 1] is the output of layer L
        ids = tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1])
    return torch.stack(rows).double().numpy()


def sklearn_direction(method, pos, neg):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    md = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return md
    if method == "pca_diff":
        d = PCA(n_components=1).fit(pos - neg).components_[0]
    elif method == "pca_center":
        centre = (pos + neg) / 2
        d = PCA(n_components=1).fit(np.vstack([pos - centre, neg - centre])).components_[0]
    else:
        clf = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(
            np.vstack([pos, neg]), [1] * len(pos) + [0] * len(neg)
        )
        d = clf.coef_[0]
    d = d / np.linalg.norm(d)
    return (d if d @ md >= 0 else -d) * np.linalg.norm(md)


@pytest.mark.parametrize("method", directions.METHODS)
def test_each_method_equals_scikit_learn(tiny, tokenizer, tmp_path, method):
    vs = directions.compute_caa(tiny, tokenizer, PAIRS, [1, 2], "sentiment", batch_size=3, method=method)
    for layer in (1, 2):
        pos = independent_activations(tiny, tokenizer, [p["positive"] for p in PAIRS], layer)
        neg = independent_activations(tiny, tokenizer, [p["negative"] for p in PAIRS], layer)
        want = sklearn_direction(method, pos, neg)
        got = vs.vectors[layer].double().numpy()
        cos = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos > 1 - 1e-6, (method, layer, cos)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), rel=1e-5)
    # the file records how the vectors were made
    back = vectorset.load(vectorset.save(vs, tmp_path / "v.safetensors"))
    assert back.method == method and back.meta["read_at"] == "last"
    assert torch.equal(back.vectors[1], vs.vectors[1])


def test_methods_differ_and_refuse_one_pair(tiny, tokenizer):
    # logistic_c=100: the tiny model's activations are ~0.1 in norm, and a strongly regularised probe
    # tends to the (centred) mean difference
    got = {m: directions.compute_caa(tiny, tokenizer, PAIRS, [2], "s", method=m, logistic_c=100.0).vectors[2]
           for m in directions.METHODS}  # fmt: skip
    for a in directions.METHODS:
        for b in directions.METHODS:
            if a < b:
                assert not torch.allclose(got[a], got[b], rtol=1e-3, atol=1e-4), (a, b)
    with pytest.raises(errors.VectorError, match="at least 2 pairs"):
        directions.compute_caa(tiny, tokenizer, PAIRS[:1], [2], "s", method="pca_diff")
    with pytest.raises(errors.VectorError, match="use one of mean_diff"):
        directions.compute_caa(tiny, tokenizer, PAIRS, [2], "s", method="ica")


@pytest.mark.parametrize("read_at", ["last", "answer", "answer_mean"])
def test_every_method_works_at_every_reading_position(tiny, tokenizer, read_at):
    for m in directions.METHODS:
        vs = directions.compute_caa(tiny, tokenizer, PAIRS[:4], [1], "s", method=m, read_at=read_at, chat_template=True)
        assert torch.isfinite(vs.vectors[1]).all() and vs.meta["read_at"] == read_at and vs.method == m


# ---------------------------------------------------------------------------------------------
# Next-token KL


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "from:2"])
def test_next_token_kl_equals_independent_computation(tiny, tokenizer, positions):
    prompts = [tokenizer(p)["input_ids"] for p in ["Tell me about your weekend.", "Describe the sea.", "Hi there"]]
    v, w = torch.randn(32) * 2, torch.randn(32) * 2
    settings = [(1, 0.0, v, "add"), (1, 2.0, v, "add"), (2, 1.0, w, "ablate"), (1, 1.5, v, "norm_preserving"),
                (2, -1.0, w, "ablate_add")]  # fmt: skip
    got = next_token_kl(tiny, prompts, settings, pad_id=2, batch_size=4, positions=positions)
    assert got[0] == (0.0, 0.0)
    for (layer, alpha, vec, mode), (mean, sem) in zip(settings[1:], got[1:], strict=True):
        kls = []
        for p in prompts:
            n = len(p)
            if positions in ("all", "prompt"):  # the whole prompt is the prefill
                start = 0
            elif positions == "generated":
                start = n - 1
            else:
                start = int(positions.split(":")[1])

            def hook(module, args, out, start=start, vec=vec, alpha=alpha, mode=mode):  # noqa: ARG001
                out = out.clone()
                out[:, start:] = plain_mode(out[:, start:], vec, alpha, mode)
                return out

            ids = torch.tensor([p])
            with torch.inference_mode():
                lp = torch.log_softmax(tiny(input_ids=ids).logits[0, -1].double(), -1)
                handle = get_layers(tiny)[layer].register_forward_hook(hook)
                try:
                    lq = torch.log_softmax(tiny(input_ids=ids).logits[0, -1].double(), -1)
                finally:
                    handle.remove()
            kls.append(float((lq.exp() * (lq - lp)).sum()))
        assert mean == pytest.approx(np.mean(kls), rel=1e-3, abs=1e-6), (mode, positions)  # float32 forwards
        assert sem == pytest.approx(np.std(kls, ddof=1) / np.sqrt(len(kls)), rel=1e-2, abs=1e-7)
        assert mean > 0


# ---------------------------------------------------------------------------------------------
# The real model: every method's sentiment direction steers the behaviour the expected way


@pytest.mark.slow
def test_each_method_moves_sentiment_behavior_on_the_embedded_model(real_model, tokenizer, capsys):
    """Every method x mode at layer 10, alphas -1, 0, 1, scored in one batched call (rows of all
    methods and modes side by side). pca_diff is the exception, and the test says why."""
    pairs = load_pairs("sentiment_pairs")
    items = load_behavior_items("sentiment_continuations")[:32]
    enc = encode_behavior_items(tokenizer, items, "continuation", False)
    layer, alphas, modes = 10, (-1.0, 0.0, 1.0), ("add", "ablate_add", "norm_preserving")
    vecs = {m: directions.compute_caa(real_model, tokenizer, pairs, [layer], "sentiment", method=m).vectors[layer]
            for m in directions.METHODS}  # fmt: skip
    keys = [(m, mode, a) for m in directions.METHODS for mode in modes for a in alphas] + [
        (m, "ablate", 1.0) for m in directions.METHODS
    ]
    res = behavior_probs(real_model, enc, [(layer, a, vecs[m], mode) for m, mode, a in keys], pad_id_of(tokenizer))
    p = {k: r[0] for k, r in zip(keys, res, strict=True)}
    md = vecs["mean_diff"]
    cos = {m: float(torch.nn.functional.cosine_similarity(vecs[m], md, dim=0)) for m in directions.METHODS}
    with capsys.disabled():
        print(f"\nbehavior_prob, layer {layer}, alphas {alphas} (ablate: alpha 1); cosine with mean_diff")
        for m in directions.METHODS:
            for mode in (*modes, "ablate"):
                ps = [p[(m, mode, a)] for a in alphas if (m, mode, a) in p]
                print(f"  {m:10s} {mode:15s} " + "  ".join(f"{x:.3f}" for x in ps) + f"   cos {cos[m]:.3f}")
    base = p[("mean_diff", "add", 0.0)]
    for m in ("mean_diff", "pca_center", "logistic"):
        for mode in modes:
            lo, mid, hi = (p[(m, mode, a)] for a in alphas)
            assert lo < mid - 0.1 and hi > mid + 0.05 and hi > 0.9, (m, mode, lo, mid, hi)
    # pca_diff (repeng's: PCA centres the differences) finds how the pairs' differences vary around
    # their mean, nearly orthogonal to the mean itself here: it does not steer this concept
    assert abs(cos["pca_diff"]) < 0.5
    assert abs(p[("pca_diff", "add", 1.0)] - base) < abs(p[("mean_diff", "add", 1.0)] - base) / 2


# ---------------------------------------------------------------------------------------------
# Configuration


def test_method_mode_and_positions_are_part_of_the_identity():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from steersweep.core.config import register_configs
    from steersweep.runs.identity import identity, identity_hash

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    hashes = set()
    for extra in ([], ["vectors.method=logistic"], ["steering.mode=ablate"], ["steering.positions=from:3"]):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=extra)
        ident = identity(cfg)
        hashes.add(identity_hash(ident))
        assert ident["vectors"]["method"] == cfg.vectors.method and ident["steering"]["mode"] == cfg.steering.mode
    assert len(hashes) == 4


def test_a_sweep_generates_in_its_configured_mode(tiny, tokenizer, embedded_dir, tmp_path):
    """The sweep's own rows (not only the scoring) use steering.mode: each ablate row equals a
    direct ablate decode of its cell, and differs from the add run of the same grid."""
    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.vectors.vectorset import load

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    common = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
              "generation.max_new_tokens=6", "eval.metrics=[]", "steering.layers=[1]", "steering.alphas=[0,3]",
              "progress=false", "report.enabled=false"]  # fmt: skip
    tables = {}
    for mode in ("add", "ablate"):
        run = ss.Sweep.from_config(overrides=[*common, f"steering.mode={mode}"], run_dir=tmp_path / mode)
        tables[mode] = pd.DataFrame(run.run()).sort_values("cell_id").reset_index(drop=True)
    add, abl = tables["add"], tables["ablate"]
    assert set(abl["mode"]) == {"ablate"}
    steered = abl[abl.alpha != 0]
    assert (steered.completion.to_numpy() != add[add.alpha != 0].completion.to_numpy()).any()
    vs = load(tmp_path / "ablate" / "vectors.safetensors")
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=6))
    for _, row in steered.iterrows():
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        direct = generate_rows(tiny, tokenizer, ids, [(1, 3.0, vs.vectors[1], "ablate")], gen)[0]
        assert direct.text == row.completion


# ---------------------------------------------------------------------------------------------
# Layer sets, and methods and modes as grid axes (issue 13, phase B)


def test_a_row_steering_a_set_of_layers_equals_hand_hooks_on_each(tiny):
    """A row made of parts on several layers applies each layer's own vector and mode, as hooks
    written by hand on those layers do; mixed with single-layer rows in one batch, it equals its own
    single-row forward."""
    ids = torch.randint(3, 1000, (3, 6))
    v = {layer: torch.randn(32) * 2 for layer in range(4)}
    multi = [(1, 1.5, v[1], "ablate_add"), (3, 1.5, v[3], "ablate_add")]
    rows = [multi, (2, -1.0, v[2], "add"), [(layer, 1.0, v[layer], "ablate") for layer in range(4)]]
    with steer(tiny, row_deltas(rows)):
        batched = tiny(input_ids=ids).logits
    for b, row in enumerate(rows):
        with steer(tiny, row_deltas([row])):
            single = tiny(input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-5)
        parts = row if isinstance(row, list) else [row]
        handles = []
        for layer, alpha, vec, mode in parts:

            def hook(module, args, out, alpha=alpha, vec=vec, mode=mode):  # noqa: ARG001
                return plain_mode(out, vec, alpha, mode)

            handles.append(get_layers(tiny)[layer].register_forward_hook(hook))
        try:
            ref = tiny(input_ids=ids[b : b + 1]).logits
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-4)


def test_ablating_one_direction_at_every_layer_leaves_no_component_anywhere(tiny):
    """The refusal-ablation case: one unit direction projected out after every layer; each layer's
    output then has no component along it (recorded after the steering hooks)."""
    ids = torch.randint(3, 1000, (2, 7))
    u = torch.randn(32)
    n = len(get_layers(tiny))
    row = [(layer, 1.0, u, "ablate") for layer in range(n)]
    with steer(tiny, row_deltas([row, row])), record(tiny, list(range(n))) as store:
        tiny(input_ids=ids)
    for layer in range(n):
        proj = store[layer][0] @ (u / u.norm())
        assert proj.abs().max() < 1e-4, (layer, proj.abs().max())
    with record(tiny, [n - 1]) as plain:
        tiny(input_ids=ids)
    assert (plain[n - 1][0] @ (u / u.norm())).abs().max() > 1e-2  # the plain model has such a component


def test_generation_with_layer_sets_equals_single_rows(tiny, tokenizer):
    """Per-row batching across layer sets and modes in one decode: each row equals its single-row run
    (float32), and alpha 0 on a set is the unsteered row."""
    ids = [tokenizer(p)["input_ids"] for p in ["Tell me about your weekend.", "Hi"]]
    v = {layer: torch.randn(32) * 2 for layer in range(4)}
    specs = [
        [(1, 2.0, v[1], "add"), (2, 2.0, v[2], "add")],
        [(1, 2.0, v[1], "ablate_add"), (2, 2.0, v[2], "ablate_add")],
        (1, 2.0, v[1], "norm_preserving"),
        [(layer, 1.0, v[layer], "ablate") for layer in range(4)],
        [(1, 0.0, v[1], "add"), (2, 0.0, v[2], "add")],
    ]
    cells = [(i, s) for i in range(len(ids)) for s in specs]
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=8))
    batch = generate_rows(tiny, tokenizer, [ids[i] for i, _ in cells], [s for _, s in cells], gen)
    for (i, s), comp in zip(cells, batch, strict=True):
        assert comp.token_ids == generate_rows(tiny, tokenizer, [ids[i]], [s], gen)[0].token_ids
    plain = generate_rows(tiny, tokenizer, ids, [(1, 0.0, v[1])] * 2, gen)
    assert [batch[k * len(specs) + 4].token_ids for k in range(2)] == [c.token_ids for c in plain]
    assert len({tuple(c.token_ids) for c in batch}) > 2 * 2


def test_several_methods_from_one_pass_equal_each_method_alone(tiny, tokenizer):
    pairs = load_pairs("sentiment_pairs")[:8]
    together = directions.compute_methods(tiny, tokenizer, pairs, [1, 3], "c", ["logistic", "mean_diff", "pca_diff"])
    for method, vs in together.items():
        alone = directions.compute_caa(tiny, tokenizer, pairs, [1, 3], "c", method=method)
        assert vs.method == method
        for layer in (1, 3):
            assert torch.equal(vs.vectors[layer], alone.vectors[layer]), (method, layer)
        assert vs.resid_norms == alone.resid_norms
    assert not torch.allclose(together["mean_diff"].vectors[1], together["pca_diff"].vectors[1])


def grid(**steering):
    base = {"layers": [1], "alphas": [0.0, 2.0], "samples": 1, "mode": "add"}
    return OmegaConf.create(
        {
            "steering": {**base, **steering},
            "generation": {"seed": 0},
            "vectors": {"concept": "c", "method": "mean_diff"},
        }
    )


def test_the_grid_has_every_method_mode_and_layer_set_once():
    from steersweep.runs.grid import Grid, cell_key, expand, layer_sets

    prompts = [{"id": "p0", "prompt": "a"}, {"id": "p1", "prompt": "b"}]
    cfg = grid(layers=[1, [1, 3], "all"], mode=["add", "ablate"])
    cfg.vectors.method = ["mean_diff", "pca_diff"]
    cells = expand(Grid.of(cfg), prompts, "h", num_layers=4)
    assert len(cells) == 2 * 2 * 2 * 3 * 2 and len({c.cell_id for c in cells}) == len(cells)
    assert {c.label for c in cells} == {"1", "1+3", "all"}
    assert {c.steered_layers for c in cells} == {(1,), (1, 3), (0, 1, 2, 3)}
    assert len({c.setting for c in cells}) == 2 * 2 * 3 * 2 and {c.concept for c in cells} == {"c"}
    # paired comparisons: a cell samples with the same seed under every method and mode
    seeds = {}
    for c in cells:
        seeds.setdefault((c.label, c.alpha, c.prompt_id), set()).add(c.seed)
    assert all(len(s) == 1 for s in seeds.values())
    # the baseline: a prompt's alpha-0 cells (every layer set, method, mode) come first, side by side,
    # and share one seed, whatever the layer
    for p in prompts:
        mine = [c for c in cells if c.prompt_id == p["id"]]
        assert [c.alpha for c in mine[:12]] == [0.0] * 12 and 0.0 not in [c.alpha for c in mine[12:]]
        assert len({c.seed for c in mine[:12]}) == 1 and len({c.decode_key for c in mine[:12]}) == 1
    # a plain grid (single layers, one method, one mode) keeps the ids it had before these axes
    plain = expand(Grid.of(grid(layers=[1, 2])), prompts, "h")
    assert [c.cell_id for c in plain] == [
        cell_key("h", layer, alpha, p["id"], 0) for p in prompts for alpha in (0.0, 2.0) for layer in (1, 2)
    ]
    assert layer_sets([[3, 1]]) == [("1+3", (1, 3))]
    with pytest.raises(ValueError, match="needs the model's number of layers"):
        layer_sets(["all"])


def test_a_sweep_over_methods_modes_and_layer_sets(tiny, tokenizer, embedded_dir, tmp_path):
    """One run, one model load: 2 methods x 2 modes x 2 layer sets x 2 alphas x 2 prompts. Every row
    equals a direct decode of its cell with its own method's vectors; per-setting metrics are keyed so
    that a second run finds them all (nothing is scored or generated again)."""
    import json

    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.runs.folder import RunFolder
    from steersweep.vectors.vectorset import load

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
            "generation.max_new_tokens=6", "eval.metrics=[behavior_prob,next_token_kl]", "eval.behavior_limit=3",
            "steering.layers=[1,[1,3]]", "steering.alphas=[0,3]", "steering.mode=[add,ablate_add]",
            "vectors.method=[mean_diff,pca_center]", "progress=false", "report.enabled=false"]  # fmt: skip
    folder = tmp_path / "grid"
    df = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=folder).run())
    assert len(df) == 2 * 2 * 2 * 2 * 2 and df.cell_id.is_unique
    assert set(df.layers) == {"1", "1+3"} and set(df.method) == {"mean_diff", "pca_center"}
    assert set(df["mode"]) == {"add", "ablate_add"}
    assert (df.groupby(["method", "mode", "layers", "alpha"]).size() == 2).all()
    vsets = {
        "mean_diff": load(folder / "vectors.safetensors"),
        "pca_center": load(folder / "vectors-pca_center.safetensors"),
    }
    assert {m: vs.method for m, vs in vsets.items()} == {"mean_diff": "mean_diff", "pca_center": "pca_center"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["vectors_by_set"]) == {"sentiment/mean_diff", "sentiment/pca_center"}
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=6))
    for _, row in df.iterrows():
        layers = [int(x) for x in row.layers.split("+")]
        spec = [(layer, row.alpha, vsets[row.method].vectors[layer], row["mode"]) for layer in layers]
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        assert generate_rows(tiny, tokenizer, ids, [spec], gen)[0].text == row.completion, row.cell_id
        if len(layers) == 1:
            assert row.vector_id == vsets[row.method].vector_id(layers[0])
        else:  # the set's id: concept, label, and the hash of its layers' own tensor hashes
            import hashlib

            own = "|".join(
                f"{k}:{hashlib.sha256(vsets[row.method].vectors[k].numpy().tobytes()).hexdigest()}" for k in layers
            )
            assert row.vector_id == f"sentiment-L1+3-{hashlib.sha256(own.encode()).hexdigest()[:12]}"
            assert row.hook_name == "blocks.1.hook_resid_post+blocks.3.hook_resid_post"
    steered = df[df.alpha != 0]
    assert steered.groupby(["prompt_id", "layers", "alpha"]).completion.nunique().max() > 1  # variants differ
    assert steered.groupby(["method", "mode", "layers"]).behavior_prob.first().nunique() > 1
    done = RunFolder(folder).behavior_done()
    assert set(done) == {(r.concept, r.layers, r.alpha, r.method, r["mode"]) for _, r in df.iterrows()}
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=folder).run())
    pd.testing.assert_frame_equal(again.sort_values("cell_id").reset_index(drop=True),
                                  df.sort_values("cell_id").reset_index(drop=True))  # fmt: skip


FORMAL = [
    ("I would be delighted to attend the meeting.", "yeah sure i'll show up lol"),
    ("Please find the report attached for your review.", "here's the thing u wanted"),
    ("We regret to inform you that the event is cancelled.", "sorry folks, no party"),
    ("Kindly confirm your availability at your earliest convenience.", "u free or what"),
    ("The committee has approved the proposal.", "they said ok to the plan"),
    ("I appreciate your prompt response.", "thx for getting back quick"),
]


def test_two_concepts_in_one_run_from_datasets_and_from_files(tiny, tokenizer, embedded_dir, tmp_path):
    """vectors.concept as a list: each concept's vectors from its own dataset, one grid axis; rows
    equal direct decodes with their own concept's vectors; then the same two concepts from files."""
    import json

    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.vectors.vectorset import load

    pairs = tmp_path / "formal.jsonl"
    pairs.write_text("".join(json.dumps({"positive": a, "negative": b}) + "\n" for a, b in FORMAL))
    items = tmp_path / "formal_items.jsonl"  # the formal concept's own behaviour items
    items.write_text("".join(json.dumps({"id": f"f{i}", "prefix": p, "positive": a, "negative": b}) + "\n" for i, (p, a, b) in
                             enumerate([("The letter began", " Dear Sir", " hey dude"), ("She signed it", " Sincerely", " xoxo")])))  # fmt: skip
    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    common = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
              "generation.max_new_tokens=5", "eval.metrics=[behavior_prob]", "eval.behavior_limit=2",
              "steering.layers=[2]", "steering.alphas=[0,4]", "progress=false", "report.enabled=false"]  # fmt: skip
    over = [*common, "vectors.concept=[sentiment,formal]", f"vectors.dataset=[sentiment_pairs,{pairs}]",
            f"eval.behavior_dataset=[sentiment_continuations,{items}]"]  # fmt: skip
    run = ss.Sweep.from_config(overrides=[*over, f"results_root={tmp_path / 'res'}"])
    df = pd.DataFrame(run.run())
    folder = run.run_dir
    assert "-sentiment+formal-" in folder.name
    assert len(df) == 2 * 2 * 2 and set(df.concept) == {"sentiment", "formal"}
    vsets = {
        "sentiment": load(folder / "vectors.safetensors"),
        "formal": load(folder / "vectors-formal-mean_diff.safetensors"),
    }
    assert vsets["formal"].concept == "formal" and not torch.equal(
        vsets["formal"].vectors[2], vsets["sentiment"].vectors[2]
    )
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=5))
    for _, row in df.iterrows():
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        direct = generate_rows(tiny, tokenizer, ids, [(2, row.alpha, vsets[row.concept].vectors[2])], gen)[0]
        assert direct.text == row.completion and row.vector_id.startswith(f"{row.concept}-L2-")
    assert df[df.alpha != 0].groupby("concept").behavior_prob.first().nunique() == 2
    # each concept's rows are scored on its own items: alpha 0 is the same model, other items
    base = df[df.alpha == 0].groupby("concept").behavior_prob.first()
    assert base["sentiment"] != base["formal"]
    from steersweep.inputs.datasets import load_behavior_items
    from steersweep.inputs.encoding import pad_id_of
    from steersweep.scoring.behavior import behavior_probs, encode_behavior_items

    enc = encode_behavior_items(tokenizer, load_behavior_items(str(items)), "continuation", True)
    want = behavior_probs(tiny, enc, [(2, 0.0, vsets["formal"].vectors[2])], pad_id_of(tokenizer))[0][0]
    assert base["formal"] == pytest.approx(want, abs=1e-6)
    # the same concepts from the saved files, as a user would reuse them
    files = [folder / "vectors.safetensors", folder / "vectors-formal-mean_diff.safetensors"]
    over = [
        *common,
        "vectors.source=file",
        "vectors.concept=[sentiment,formal]",
        f"vectors.path=[{files[0]},{files[1]}]",
    ]
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "from files").run())
    key = ["concept", "prompt_id", "alpha"]
    pd.testing.assert_series_equal(again.sort_values(key).completion.reset_index(drop=True),
                                   df.sort_values(key).completion.reset_index(drop=True))  # fmt: skip
    with pytest.raises(Exception, match="lists 2 concept.* gives 1: give one per concept"):
        ss.Sweep.from_config(overrides=[*common, "vectors.concept=[sentiment,formal]"], run_dir=tmp_path / "x").run()


def test_a_multi_axis_grid_resumes_without_rescoring(tiny, embedded_dir, tmp_path, monkeypatch, caplog):
    """A job that dies after one of its batches (methods x modes x layer sets, 4-decode batches) and is
    run again: the table equals an uninterrupted run's, and the resumed job scores no setting the
    dead one had scored (read back from its item files)."""
    import logging

    import pandas as pd

    import steersweep as ss
    from steersweep.runs.folder import RunFolder

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
            "generation.max_new_tokens=4", "generation.batch_size=4", "eval.metrics=[behavior_prob,next_token_kl]",
            "eval.behavior_limit=2", "steering.layers=[1,[1,3]]", "steering.alphas=[0,3]",
            "steering.mode=[add,norm_preserving]", "vectors.method=[mean_diff,pca_diff]", "progress=false",
            "report.enabled=false"]  # fmt: skip
    ref = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "ref").run())
    real, written = RunFolder.write_part, []

    def dies_after_one(self, rows, worker):  # the 2nd batch's items are written, its part is not
        if len(written) == 1:
            raise KeyboardInterrupt("killed")
        written.append(len(rows))
        return real(self, rows, worker)

    monkeypatch.setattr(RunFolder, "write_part", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run").run()
    monkeypatch.setattr(RunFolder, "write_part", real)

    # what the dead job had scored: the settings in its item files (written before each batch's part), where
    # every alpha-0 setting is one unit (the unsteered model, scored once; the others copy it)
    def units(settings):
        return {("baseline",) if alpha == 0 else (layers, alpha, m, mode) for layers, alpha, m, mode in settings}

    every = units({(r.layers, r.alpha, r.method, r.mode) for r in ref.itertuples()})
    items = RunFolder(tmp_path / "run").read_items()
    scored_before = units({(r.layers, r.alpha, r.method, r.mode) for r in items.itertuples()})
    assert 0 < len(scored_before) < len(every) == 1 + 8  # the baseline + 2 methods x 2 modes x 2 sets at alpha 3
    caplog.set_level(logging.INFO, logger="steersweep")
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run").run())
    key = "cell_id"
    pd.testing.assert_frame_equal(
        again.drop(columns=["seconds", "worker", "run_id"]).sort_values(key).reset_index(drop=True),
        ref.drop(columns=["seconds", "worker", "run_id"]).sort_values(key).reset_index(drop=True),
    )
    scored = sum(
        int(r.getMessage().split()[2]) for r in caplog.records if r.getMessage().startswith("behavior_prob for")
    )
    assert scored == len(every) - len(scored_before)
    assert pd.read_parquet(tmp_path / "run" / "items.parquet").equals(
        pd.read_parquet(tmp_path / "ref" / "items.parquet")
    )
