"""Shared prompt passes: each decoder layer runs once per distinct state entering it
(hooks.shared_trunk), perplexity reads each prompt once (generation.prompt_cache), and every row
comes out as if it had been computed alone (float32, tiny random models)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers.models import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from steersweep.core.config import GenerationConfig
from steersweep.generation.decode import generate_rows
from steersweep.hooks import forward
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import row_deltas, steer
from steersweep.hooks.trunk import shared_trunk
from steersweep.inputs.encoding import model_inputs
from steersweep.scoring.behavior import behavior_probs, encode_behavior_items
from steersweep.scoring.metrics import next_token_kl, perplexities, score_tails

PROMPTS = ["Tell me about your weekend.", "Describe the sea.", "Hi"]


def gen_cfg(n: int = 8) -> GenerationConfig:
    return OmegaConf.structured(GenerationConfig(max_new_tokens=n))


def grid_rows(v: dict[int, torch.Tensor]) -> list:
    """Per prompt: the unsteered row, one layer at two alphas, deeper layers, a layer set, other modes."""
    return [
        (1, 0.0, v[1]),
        (1, 2.0, v[1]),
        (1, -2.0, v[1]),
        (3, 2.0, v[3]),
        (4, 1.5, v[4]),
        [(1, 1.0, v[1]), (4, 1.0, v[4])],
        (3, 1.0, v[3], "ablate"),
        (4, 3.0, v[4], "norm_preserving"),
        (0, 2.0, v[0], "ablate_add"),
    ]


@contextlib.contextmanager
def rows_seen(model):
    """Rows entering each decoder layer, per forward call: {layer: [rows, ...]}."""
    seen: dict[int, list[int]] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0].shape[0]))
        for i, layer in enumerate(get_layers(model))
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("positions", ["all", "prompt", "from:2"])
def test_shared_prompt_pass_rows_equal_each_row_alone(tokenizer, positions):
    model = tiny_llama(layers=6)
    v = {layer: torch.randn(32) * 2 for layer in range(6)}
    per_prompt = grid_rows(v)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in per_prompt]
    rows = per_prompt * len(PROMPTS)
    with rows_seen(model) as seen:
        batch = generate_rows(model, tokenizer, ids, rows, gen_cfg(), positions=positions)
    # the prompt pass, per prompt: 1 row into layer 0; layer 0's ablate_add splits off 1 (2 into
    # layer 1); layer 1's three rows (5 into layers 2 and 3); layer 3's two (7 into layer 4)
    assert [seen[layer][0] for layer in range(6)] == [3, 6, 15, 15, 21, 27]
    assert all(n == len(rows) for layer in range(6) for n in seen[layer][1:])  # decoding: every row
    for i in range(len(rows)):
        alone = generate_rows(model, tokenizer, [ids[i]], [rows[i]], gen_cfg(), positions=positions)[0]
        assert batch[i].token_ids == alone.token_ids, (i, positions)
    assert len({tuple(c.token_ids) for c in batch}) > len(PROMPTS)  # the steering did something


def test_shared_prompt_pass_equals_the_unshared_one_exactly(tokenizer):
    """Logits and every layer's KV cache, bit for bit, against the same batch run without sharing."""
    model = tiny_llama(layers=6)
    v = {layer: torch.randn(32) * 2 for layer in range(6)}
    per_prompt = grid_rows(v)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in per_prompt]
    rows = per_prompt * len(PROMPTS)
    inputs = model_inputs(ids, 2)
    with torch.inference_mode():
        deltas = row_deltas(rows)
        with steer(model, deltas):
            plain = model(**inputs, use_cache=True)
        deltas = row_deltas(rows)
        with steer(model, deltas), shared_trunk(model, inputs["input_ids"], inputs["attention_mask"], deltas) as trunk:
            assert trunk is not None and trunk.feed.tolist() == [0, 9, 18]
            shared = model(**{n: t[trunk.feed] for n, t in inputs.items()}, use_cache=True)
            trunk.widen_cache(shared.past_key_values)
    assert torch.equal(shared.logits, plain.logits)
    for a, b in zip(shared.past_key_values.layers, plain.past_key_values.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert all(rd.view is None for rd in deltas.values())  # the views end with the block


def test_rows_with_nothing_in_common_skip_the_trunk(tokenizer):
    model = tiny_llama()
    inputs = model_inputs([tokenizer(p)["input_ids"] for p in PROMPTS], 2)
    deltas = row_deltas([(1, 1.0, torch.randn(32))] * 3)
    with shared_trunk(model, inputs["input_ids"], inputs["attention_mask"], deltas) as trunk:
        assert trunk is None


def test_scoring_shares_the_prompt_pass_and_equals_the_unshared_batch(tokenizer, monkeypatch):
    """behaviour log-probs and next-token KL: settings x items in one batch with sharing equal, bit
    for bit, the same batch without it, and within float32 rounding each row scored alone (alone, a
    row has no padding: sdpa runs unmasked, which moves the last digit before and after sharing)."""

    model = tiny_llama(layers=6)
    v = {layer: torch.randn(32) * 2 for layer in range(6)}
    settings = [(1, a, v[1]) for a in (-2.0, 1.0, 2.0)] + [(4, 2.0, v[4]), (3, 1.0, v[3], "ablate")]
    seqs = [tokenizer(p)["input_ids"] + [300, 301] for p in PROMPTS]
    all_seqs = [s for _ in settings for s in seqs]
    steering = [st for st in settings for _ in seqs]
    tails = [2] * len(all_seqs)
    items = [{"prefix": p, "positive": " yes, gladly", "negative": " no"} for p in PROMPTS]
    enc = encode_behavior_items(tokenizer, items, "continuation", chat=False)

    def scores(batch_size: int) -> tuple:
        return (
            score_tails(model, all_seqs, tails, 2, steering, batch_size=batch_size)[0],
            behavior_probs(model, enc, settings, 2, batch_size=batch_size),
            [next_token_kl(model, seqs, settings, 2, batch_size=batch_size, positions=p) for p in ("all", "generated")],
        )

    with rows_seen(model) as seen:
        score_tails(model, all_seqs, tails, 2, steering, batch_size=64)
    assert seen[0] == [len(PROMPTS)] and seen[5] == [len(all_seqs)]  # one forward, shared below layer 1
    shared = scores(64)
    alone = scores(1)

    @contextlib.contextmanager
    def unshared(*args, **kwargs):
        yield None

    monkeypatch.setattr(forward, "shared_trunk", unshared)  # what hooks.forward.shared_forward enters
    with rows_seen(model) as seen:
        score_tails(model, all_seqs, tails, 2, steering, batch_size=64)
    assert seen[0] == [len(all_seqs)]
    assert scores(64) == shared
    flat = [torch.tensor(x, dtype=torch.float64).flatten() for x in (shared[0], shared[1], shared[2])]
    ref = [torch.tensor(x, dtype=torch.float64).flatten() for x in (alone[0], alone[1], alone[2])]
    for a, b in zip(flat, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(m > 0 for m, _ in shared[2][0])  # the steering moved the next token


def test_perplexity_reads_each_prompt_once_and_equals_a_plain_forward_per_row(tokenizer):
    """Rows of one prompt continue one KV cache of it; each row's perplexity equals a plain
    unpadded forward of its prompt + completion (float32 rounding apart)."""
    model = tiny_llama(layers=3)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    comps = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [], [14, 15]]
    rows_p = [prompts[i % len(prompts)] for i in range(12)]
    rows_c = [comps[i % len(comps)] for i in range(12)]
    with rows_seen(model) as seen:
        got = perplexities(model, rows_p, rows_c, 2, batch_size=64)
    assert seen[0][0] == len(PROMPTS)  # the prompts, once each; then every row with a completion
    assert seen[0][1:] == [sum(1 for c in rows_c if c)]
    for p, c, ppl in zip(rows_p, rows_c, got, strict=True):
        if not c:
            assert math.isnan(ppl)
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([p + c])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(-1, torch.tensor(c)[:, None])
        assert ppl == pytest.approx(math.exp(-float(lp.mean())), rel=1e-5)
    assert len({round(x, 6) for x in got if not math.isnan(x)}) > 3


def test_shared_passes_through_accelerate_offload_hooks(tokenizer, tmp_path):
    """The layers' own accelerate hooks (here disk offload: weights loaded per forward, as for a
    model spilling past its GPU budget) wrap the forward inside the trunk's and steering's hooks:
    generation, scoring and perplexity equal the same model held whole."""
    import copy

    from accelerate import dispatch_model

    whole = tiny_llama(layers=4)
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dmap |= {f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(4)}
    model = dispatch_model(copy.deepcopy(whole), device_map=dmap, offload_dir=str(tmp_path))
    assert model.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    v = {1: torch.randn(32) * 2, 3: torch.randn(32) * 2}
    per_prompt = [(layer, a, v[layer]) for layer in (1, 3) for a in (0.0, 2.0, -2.0)]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in per_prompt]
    rows = per_prompt * len(PROMPTS)

    def run(m) -> tuple:
        outs = generate_rows(m, tokenizer, ids, rows, gen_cfg())
        comps = [o.token_ids for o in outs]
        tails = score_tails(m, [i + c for i, c in zip(ids, comps, strict=True)], [len(c) for c in comps], 2, rows)[0]
        return comps, tails, perplexities(m, ids, comps, 2)

    got, ref = run(model), run(whole)
    assert got == ref
    assert len({tuple(c) for c in ref[0]}) > len(PROMPTS)


VECTORS = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
MODES = ["add", "ablate", "ablate_add", "norm_preserving"]
PART = st.tuples(st.integers(0, 4), st.sampled_from([0.0, 1.0, -2.0]), st.integers(0, 2), st.sampled_from(MODES))
ROWS = st.lists(
    st.tuples(st.integers(0, 2), st.lists(PART, max_size=3, unique_by=lambda p: p[0])), min_size=1, max_size=12
)


def effect(part: tuple) -> tuple | None:
    """What one steering part does, written out plainly: alpha 0 nothing; ablate removes the
    direction whatever the alpha's size; the other modes depend on alpha."""
    layer, alpha, vec, mode = part
    if alpha == 0:
        return None
    return (layer, vec, mode) if mode == "ablate" else (layer, alpha, vec, mode)


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_trunk_classes_are_the_rows_alike_so_far(batch):
    """Two rows share a class entering layer l exactly when they have the same input and steer
    alike on every layer before l; after the last layer every row is its own."""
    from steersweep.hooks.trunk import Trunk

    n_layers = 5
    inputs = [prompt for prompt, _ in batch]
    rows = [[(layer, a, VECTORS[v], mode) for layer, a, v, mode in parts] for _, parts in batch]
    trunk = Trunk.plan(inputs, row_deltas(rows), n_layers)
    if len(set(inputs)) == len(inputs):
        assert trunk is None
        return
    for layer in range(n_layers):
        alike = [
            (prompt, frozenset(e for e in map(effect, parts) if e is not None and e[0] < layer))
            for prompt, parts in batch
        ]
        cls = trunk.classes[layer]
        for a in range(len(batch)):
            for b in range(len(batch)):
                assert (cls[a] == cls[b]) == (alike[a] == alike[b]), (layer, batch[a], batch[b])
        assert trunk.reps[layer] == [cls.index(c) for c in range(max(cls) + 1)]  # first row of each class
    assert trunk.classes[n_layers] == list(range(len(batch)))
