"""Steered generation with the KV cache (generation.decode), per-row steering and batch-invariant sampling;
modes, positions and layer sets in generation equal a full recompute without a cache."""

from __future__ import annotations

import pytest
import torch
from helpers.steering import plain_mode
from omegaconf import OmegaConf

from steersweep.core.config import GenerationConfig
from steersweep.generation.baselines import seed_loop_generate
from steersweep.generation.decode import generate_rows
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import RowDelta
from steersweep.model.memory import generate_with_backoff

PROMPTS = ["Tell me about your weekend.", "Describe the sea.", "What is a good breakfast?"]


def gen_cfg(**kw) -> GenerationConfig:
    return OmegaConf.structured(GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 8), **kw))


def ids_of(tokenizer, prompts=PROMPTS):
    return [tokenizer(p)["input_ids"] for p in prompts]


def test_alpha_zero_equals_no_hook(tiny, tokenizer):
    ids = ids_of(tokenizer)
    v = torch.randn(32) * 10
    steered = generate_rows(tiny, tokenizer, ids, [(1, 0.0, v)] * 3, gen_cfg())
    plain = tiny.generate(
        **tokenizer(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=8, do_sample=False, pad_token_id=2
    )
    width = plain.shape[1] - 8
    for row, comp in zip(plain[:, width:].tolist(), steered, strict=True):
        assert row[: comp.n_new_tokens] == comp.token_ids


def test_kv_cache_matches_full_recompute_loop(tiny, tokenizer):
    ids = ids_of(tokenizer)
    v = torch.randn(32)
    for layer, alpha in [(0, 2.0), (1, -3.0), (3, 6.0), (2, 0.0)]:
        ours = generate_rows(tiny, tokenizer, ids, [(layer, alpha, v)] * 3, gen_cfg(max_new_tokens=10))
        for p, comp in zip(ids, ours, strict=True):
            ref = seed_loop_generate(tiny, p, layer, alpha, v, 10, {2})
            assert comp.token_ids == [t for t in ref if t != 2], (layer, alpha)


def test_mixed_batch_rows_equal_single_cell_runs(tiny, tokenizer):
    """Different prompts (lengths), layers and alphas in one generate call: each row as if alone."""
    v = {1: torch.randn(32), 2: torch.randn(32)}
    cells = [(p, layer, a) for p in PROMPTS for layer in (1, 2) for a in (-2.0, 0.0, 3.0)]
    ids = [tokenizer(p)["input_ids"] for p, _, _ in cells]
    batch = generate_rows(tiny, tokenizer, ids, [(layer, a, v[layer]) for _, layer, a in cells], gen_cfg())
    for i, (_, layer, a) in enumerate(cells):
        single = generate_rows(tiny, tokenizer, [ids[i]], [(layer, a, v[layer])], gen_cfg())[0]
        assert batch[i].token_ids == single.token_ids, cells[i]
    assert len({tuple(c.token_ids) for c in batch}) > 1  # the steering did something


def test_sampling_is_batch_invariant_and_seeded(tiny, tokenizer):
    ids = ids_of(tokenizer)
    v = torch.randn(32)
    cfg = gen_cfg(do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=12)
    rows = [(1, 1.0, v)] * 3
    together = generate_rows(tiny, tokenizer, ids, rows, cfg, seeds=[11, 12, 13])
    alone = [generate_rows(tiny, tokenizer, [ids[i]], [rows[i]], cfg, seeds=[s])[0] for i, s in enumerate([11, 12, 13])]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    other = generate_rows(tiny, tokenizer, ids, rows, cfg, seeds=[21, 22, 23])
    assert [c.token_ids for c in other] != [c.token_ids for c in together]
    greedy = generate_rows(tiny, tokenizer, ids, rows, gen_cfg(max_new_tokens=12))
    assert [c.token_ids for c in greedy] != [c.token_ids for c in together]


def test_stop_reason_and_counts(tiny, tokenizer):
    out = generate_rows(tiny, tokenizer, ids_of(tokenizer), [(1, 0.0, torch.zeros(32))] * 3, gen_cfg(max_new_tokens=5))
    for c in out:
        assert c.stop_reason in ("eos", "length")
        assert c.n_new_tokens == len(c.token_ids) <= 5
        assert c.stop_reason == "eos" or c.n_new_tokens == 5


def test_backoff_halves_batch_on_oom_and_loses_no_row():
    seen, done = [], []

    def run_batch(chunk):
        seen.append(len(chunk))
        if len(chunk) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    final = generate_with_backoff(run_batch, list(range(7)), 8, lambda c, o, s: done.extend(o))
    assert final == 2
    assert seen[:3] == [7, 4, 2]
    assert done == [x * 10 for x in range(7)]


def test_shared_prefill_equals_plain_generated_steering(tiny, tokenizer):
    """positions=generated: the prompt prefix is computed once per prompt, tokens unchanged."""
    v = {1: torch.randn(32) * 3, 2: torch.randn(32) * 3}
    cells = [(p, layer, a) for p in PROMPTS for layer in (1, 2) for a in (-2.0, 0.0, 3.0)]
    ids = [tokenizer(p)["input_ids"] for p, _, _ in cells]
    rows = [(layer, a, v[layer]) for _, layer, a in cells]
    shared = generate_rows(tiny, tokenizer, ids, rows, gen_cfg(), positions="generated", shared_prefill=True)
    plain = generate_rows(tiny, tokenizer, ids, rows, gen_cfg(), positions="generated", shared_prefill=False)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]
    for i in (0, 7, 17):  # and each row equals its own single-cell run
        single = generate_rows(tiny, tokenizer, [ids[i]], [rows[i]], gen_cfg(), positions="generated")[0]
        assert single.token_ids == shared[i].token_ids
    assert len({tuple(c.token_ids) for c in shared}) > 3


def test_identical_rows_generated_once(tiny, tokenizer):
    """alpha 0 on three layers is one unsteered row: decoded once, copied to all three."""
    from steersweep.hooks.layers import get_layers

    ids = ids_of(tokenizer)[:2]
    v = torch.randn(32)
    rows = [(layer, 0.0, v) for layer in (0, 1, 2)] * 2 + [(1, 2.0, v)] * 2
    prompt_ids = [ids[0]] * 3 + [ids[1]] * 3 + ids
    batch_sizes = []
    h = get_layers(tiny)[0].register_forward_hook(lambda m, a, o: batch_sizes.append(o.shape[0]))
    try:
        out = generate_rows(tiny, tokenizer, prompt_ids, rows, gen_cfg())
    finally:
        h.remove()
    # 2 baselines + 2 steered rows, not 8; the prompt pass below layer 1 runs once per prompt
    assert batch_sizes[0] == 2 and set(batch_sizes[1:]) == {4}
    assert out[0].token_ids == out[1].token_ids == out[2].token_ids
    alone = generate_rows(tiny, tokenizer, [ids[1]], [(1, 2.0, v)], gen_cfg())[0]
    assert out[7].token_ids == alone.token_ids


@pytest.mark.slow
def test_greedy_ignores_the_checkpoints_penalties(embedded_dir, tmp_path, tokenizer):
    """Qwen2.5 ships repetition_penalty 1.05: "greedy" must still be plain argmax decoding."""
    import json

    from steersweep.core.config import MemoryConfig, ModelConfig
    from steersweep.model.loading import load_model

    ckpt = tmp_path / "penalised"
    ckpt.mkdir()
    for f in embedded_dir.iterdir():
        if f.name != "generation_config.json":
            (ckpt / f.name).symlink_to(f)
    shipped = json.loads((embedded_dir / "generation_config.json").read_text())
    shipped.update(repetition_penalty=1.5, no_repeat_ngram_size=2, temperature=0.6, top_p=0.9, do_sample=True)
    (ckpt / "generation_config.json").write_text(json.dumps(shipped))
    model, tok, info = load_model(ModelConfig(name="p", path=str(ckpt), dtype="float32"), MemoryConfig(cpu="4GiB"))
    assert info["generation_config_shipped"]["repetition_penalty"] == 1.5  # recorded for the manifest
    assert "repetition_penalty" not in info["generation_config_effective"]
    ids = ids_of(tok)
    v = torch.zeros(576)
    ours = generate_rows(model, tok, ids, [(10, 0.0, v)] * 3, gen_cfg(max_new_tokens=24))
    eos = {tok.eos_token_id}
    for p, comp in zip(ids, ours, strict=True):
        ref = seed_loop_generate(model, p, 10, 0.0, v, 24, eos)  # plain argmax, full forward per token
        assert comp.token_ids == [t for t in ref if t not in eos]
    # and the shipped config really changes `generate`'s "greedy" tokens, so this test can fail
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**{**shipped, "do_sample": False, "temperature": None, "top_p": None})
    penalised = generate_rows(model, tok, ids, [(10, 0.0, v)] * 3, gen_cfg(max_new_tokens=24), engine="generate")
    assert [c.token_ids for c in penalised] != [c.token_ids for c in ours]


# ---------------------------------------------------------------------------------------------
# The decode loop (engine="loop") against transformers' generate (engine="generate")

MORE_PROMPTS = [*PROMPTS, "Hi", "Write a very long and detailed story about a dragon who learns to cook soup."]


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_decode_loop_equals_generate_with_rows_stopping_early(tiny, tokenizer, sample, positions):
    """Rows stop at different steps (an extra EOS id), so the loop drops rows and trims padding."""
    ids = [tokenizer(p)["input_ids"] for p in MORE_PROMPTS]
    # one token in 12 ends a row: rows of a random model stop at scattered steps
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(1, tiny.config.vocab_size, 12)]
    v = {1: torch.randn(32) * 2, 3: torch.randn(32) * 2}
    cells = [(i, layer, a) for i in range(len(ids)) for layer in (1, 3) for a in (-1.0, 0.0, 2.0)]
    rows = [(layer, a, v[layer]) for _, layer, a in cells]
    cfg = gen_cfg(max_new_tokens=20, do_sample=sample, temperature=1.3)
    seeds = list(range(100, 100 + len(cells))) if sample else None
    batch_sizes: list[int] = []
    widths: list[int] = []

    def spy(module, args, kwargs):  # noqa: ARG001
        h = args[0] if args else kwargs["hidden_states"]
        batch_sizes.append(h.shape[0])
        widths.append(kwargs["attention_mask"].shape[-1] if kwargs.get("attention_mask") is not None else -1)

    args = (tiny, tokenizer, [ids[i] for i, _, _ in cells], rows, cfg, seeds, positions)
    ref = generate_rows(*args, engine="generate")
    handle = tiny.model.layers[0].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ours = generate_rows(*args, engine="loop")
    finally:
        handle.remove()
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    assert [c.stop_reason for c in ours] == [c.stop_reason for c in ref]
    stops = [c.n_new_tokens for c in ref if c.stop_reason == "eos"]
    assert len(set(stops)) > 1 and len(stops) < len(ref)  # rows really stopped at different steps
    assert batch_sizes[-1] < max(batch_sizes)  # finished rows left the batch


def test_decode_loop_trims_padding_no_live_row_needs(tiny, tokenizer):
    """A long prompt that stops first: the rows left no longer pay for its padding columns."""
    ids = [tokenizer(p)["input_ids"] for p in ["Hi", "Hello", MORE_PROMPTS[-1]]]
    first = generate_rows(tiny, tokenizer, [ids[2]], [(1, 0.0, torch.zeros(32))], gen_cfg(max_new_tokens=4))[0]
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, first.token_ids[1]]  # row 3 stops at step 2
    lengths: list[int] = []

    def spy(module, args, kwargs):  # noqa: ARG001
        lengths.append(kwargs["cache"].get_seq_length() if kwargs.get("cache") is not None else 0)

    handle = tiny.model.layers[0].self_attn.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ours = generate_rows(tiny, tokenizer, ids, [(1, 0.0, torch.zeros(32))] * 3, gen_cfg(max_new_tokens=8))
    finally:
        handle.remove()
    ref = generate_rows(tiny, tokenizer, ids, [(1, 0.0, torch.zeros(32))] * 3, gen_cfg(max_new_tokens=8),
                        engine="generate")  # fmt: skip
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    assert ours[2].stop_reason == "eos" and ours[2].n_new_tokens == 1
    assert min(lengths[2:]) < len(ids[2])  # the cache lost the long prompt's columns


@pytest.mark.slow
def test_decode_loop_equals_generate_on_the_real_model_sampled_short_answers(real_model, tokenizer):
    """The EOS-heavy case on the embedded model in float32: sampled chat answers of a few words."""
    from steersweep.inputs.encoding import encode_prompts

    questions = ["Answer in one word: what colour is the sky?", "Say yes or no: is water wet?",
                 "Name one fruit.", "What is 2+2? Reply with the number only.", "Tell me a long story."]  # fmt: skip
    ids = encode_prompts(tokenizer, questions, gen_cfg())
    period = tokenizer.convert_tokens_to_ids(".")
    real_model.generation_config.eos_token_id = [tokenizer.eos_token_id, period]  # answers end at a full stop
    v = torch.randn(576) * 4
    cells = [(i, a) for i in range(len(ids)) for a in (0.0, 2.0)]
    cfg = gen_cfg(max_new_tokens=32, do_sample=True, temperature=1.0)
    args = (real_model, tokenizer, [ids[i] for i, _ in cells], [(12, a, v) for _, a in cells], cfg,
            [7 + k for k in range(len(cells))])  # fmt: skip
    ours, ref = generate_rows(*args, engine="loop"), generate_rows(*args, engine="generate")
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    assert sum(c.stop_reason == "eos" for c in ref) >= len(cells) // 2  # most rows stop early


def test_the_output_head_gets_contiguous_input_in_a_frozen_model(tokenizer):
    """The prompt pass hands the head a strided last-token slice; with frozen weights torch's matmul
    then copies the weight once per row (0.55 s instead of 0.005 s for 16 rows of the embedded model,
    gigabytes on a 70B). Every head call of a frozen model's decode must see a contiguous input."""
    from helpers.models import tiny_llama

    model = tiny_llama().eval()
    model.requires_grad_(False)
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    v = torch.randn(32)
    for positions in ("all", "generated"):
        generate_rows(model, tokenizer, ids_of(tokenizer), [(1, 1.0, v)] * 3, gen_cfg(max_new_tokens=3),
                      positions=positions)  # fmt: skip
    assert seen and all(seen), seen
    # the slice really is strided, so without the hook the head would get a non-contiguous input
    h = torch.randn(3, 7, 32)
    assert not h[:, -1:, :].is_contiguous()


def test_top_p_equals_transformers_warper():
    """Our partial-sort top-p keeps exactly the tokens transformers' warper keeps: peaked and flat
    rows, cuts inside the top k and beyond it (the warper's own full sort then decides)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from steersweep.generation.decode import TopP

    cases = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        for scale in (0.5, 2.0, 8.0, 25.0):  # flat ... peaked
            x = torch.randn(48, 3000, generator=g) * scale
            for p in (0.3, 0.9, 0.97):
                for k in (8, 256):
                    want = TopPLogitsWarper(p)(None, x.clone())
                    assert torch.equal(TopP(p, k)(None, x.clone()), want), (seed, scale, p, k)
                    cases += 1
    # ties at the cut (bf16 logits): every tied token is kept, whatever the vocabulary's order
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])  # probs .48 .18 .18 .18 .06 .02
    kept = ~torch.isinf(TopP(0.7, 2)(None, logits.clone()))
    assert kept.tolist() == [[True, True, True, True, False, False]]  # .48 + .18 < .7: the cut is a tie
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 500, generator=g) * 3).to(torch.bfloat16).float()  # bf16 values: many ties
    perm = torch.randperm(500, generator=g)
    for k in (4, 256):
        a = ~torch.isinf(TopP(0.9, k)(None, x.clone()))
        b = ~torch.isinf(TopP(0.9, k)(None, x[:, perm].clone()))
        assert torch.equal(a[:, perm], b)
        assert bool(((x.softmax(-1) * a).sum(-1) >= 0.9 - 1e-6).all())  # at least top_p is kept
    # both paths ran: some rows' cut lies within the top 8, some beyond
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(48, 3000, generator=g) * 2.0, torch.randn(48, 3000, generator=g) * 8.0])
    mass8 = x.softmax(-1).topk(8).values.sum(-1)
    assert bool((mass8 >= 0.9).any()) and bool((mass8 < 0.9).any()) and cases == 288


# ---------------------------------------------------------------------------------------------
# Injection modes, steered positions and layer sets in generation, against a full recompute


MODE_ROWS = ["add", "ablate", "ablate_add", "norm_preserving"]


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
