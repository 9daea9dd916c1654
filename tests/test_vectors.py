"""Steering vectors (vectors.directions, vectorset, exchange): every extraction method against
scikit-learn, CAA files, saving and loading, refused pickles, file modes and the GGUF control-vector exchange."""

from __future__ import annotations

import os
import pickle
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.caa import CAA_ITEMS, caa_file
from helpers.checkout import ROOT
from helpers.files import umask_mode
from safetensors.torch import save_file

from steersweep.core import errors
from steersweep.inputs.datasets import load_behavior_items, load_pairs
from steersweep.inputs.encoding import pad_id_of
from steersweep.scoring.behavior import behavior_probs, encode_behavior_items
from steersweep.vectors import directions, vectorset


def test_caa_equals_independent_mean_difference(tiny, tokenizer):
    pairs = [
        {"positive": "I love this wonderful day", "negative": "I hate this awful day"},
        {"positive": "Great food, happy people", "negative": "Bad food and sad, angry people everywhere"},
        {"positive": "Joy", "negative": "Misery and pain"},
    ]
    vs = directions.compute_caa(tiny, tokenizer, pairs, [1, 2], "sentiment", batch_size=2)
    # hidden_states[L + 1] is the output of layer L, except the last layer's (final norm applied)
    for layer in (1, 2):
        acc = {"positive": [], "negative": []}
        for p in pairs:
            for side in acc:
                ids = tokenizer(p[side], return_tensors="pt")["input_ids"]  # unpadded, one at a time
                out = tiny(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
                acc[side].append(out[0, -1])
        expected = torch.stack(acc["positive"]).mean(0) - torch.stack(acc["negative"]).mean(0)
        torch.testing.assert_close(vs.vectors[layer], expected, rtol=1e-4, atol=1e-5)
    assert vs.meta["n_pairs"] == "3"


@pytest.mark.parametrize("chat", [True, False])
def test_caa_file_vector_equals_independent_answer_letter_computation(tiny, tokenizer, tmp_path, chat):
    """The paper's way: activation at the answer letter of question + "(A" minus that of "(B"
    (matching minus not matching), with the chat template applied exactly once."""
    from steersweep.inputs.datasets import load_pairs

    pairs = load_pairs(str(caa_file(tmp_path / "caa.json")))
    vs = directions.compute_caa(
        tiny, tokenizer, pairs, [1, 2], "refusal", batch_size=2, chat_template=chat, read_at="answer"
    )
    for layer in (1, 2):
        acc = {"match": [], "other": []}
        for item in CAA_ITEMS:
            for side, key in (("match", "answer_matching_behavior"), ("other", "answer_not_matching_behavior")):
                letter = item[key].strip()[:2]  # "(A" / "(B": the answer up to its letter
                if chat:  # written plainly: the template renders BOS itself, so no special tokens added
                    text = tokenizer.apply_chat_template(
                        [{"role": "user", "content": item["question"]}], tokenize=False, add_generation_prompt=True
                    )
                    ids = tokenizer(text + letter, add_special_tokens=False, return_tensors="pt")["input_ids"]
                else:
                    ids = tokenizer(item["question"] + "\n\nAnswer: " + letter, return_tensors="pt")["input_ids"]
                assert ids[0, :2].tolist() != [tokenizer.bos_token_id] * 2  # never a double BOS
                out = tiny(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
                acc[side].append(out[0, -1])  # the letter is the last token
        expected = torch.stack(acc["match"]).mean(0) - torch.stack(acc["other"]).mean(0)
        torch.testing.assert_close(vs.vectors[layer], expected, rtol=1e-4, atol=1e-5)
    assert vs.meta["read_at"] == "answer" and vs.meta["pairs_format"] == "ab"


def test_chat_template_text_pairs_read_the_text_not_the_closing_tokens(tiny, tokenizer):
    """With the chat template, position -1 is the template's end-of-turn token, the same for every
    example: `read_at=answer` reads the text's own last token instead."""
    pairs = [{"positive": "I love it", "negative": "I hate it"}, {"positive": "Joy", "negative": "Misery"}]
    last = directions.compute_caa(tiny, tokenizer, pairs, [1], "s", chat_template=True, read_at="last")
    own = directions.compute_caa(tiny, tokenizer, pairs, [1], "s", chat_template=True, read_at="answer")
    for p in pairs:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p["positive"]}], tokenize=False)
        assert text.count(p["positive"]) == 1
    # reading the closing tokens sees the content only through attention; the text's token directly
    assert not torch.allclose(last.vectors[1], own.vectors[1])
    manual = {}
    for side in ("positive", "negative"):
        rows = []
        for p in pairs:
            before = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False).split("\x00")[
                0
            ]
            n = len(tokenizer(before + p[side], add_special_tokens=False)["input_ids"])
            full = tokenizer.apply_chat_template([{"role": "user", "content": p[side]}], tokenize=False)
            ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(tiny(input_ids=ids, output_hidden_states=True).hidden_states[2][0, n - 1])
        manual[side] = torch.stack(rows).mean(0)
    torch.testing.assert_close(own.vectors[1], manual["positive"] - manual["negative"], rtol=1e-4, atol=1e-5)


def test_safetensors_round_trip(tmp_path):
    vs = vectorset.VectorSet({2: torch.randn(32), 5: torch.randn(32)}, "joy", {"model": "tiny"}, {2: 3.5, 5: 4.0})
    p = vectorset.save(vs, tmp_path / "v.safetensors")
    back = vectorset.load(p)
    assert back.concept == "joy" and back.resid_norms == {2: 3.5, 5: 4.0}
    for layer in (2, 5):
        assert torch.equal(back.vectors[layer], vs.vectors[layer])
        assert back.vector_id(layer) == vs.vector_id(layer)


def test_transformerlens_pt_keys(tmp_path):
    a, b = torch.randn(32), torch.randn(32)
    torch.save({"blocks.3.hook_resid_post": a, "blocks.2.hook_resid_pre": b}, tmp_path / "tl.pt")
    vs = vectorset.load(tmp_path / "tl.pt")
    assert torch.equal(vs.vectors[3], a)
    assert torch.equal(vs.vectors[1], b)  # resid_pre of block 2 is the output of layer 1


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pt_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"blocks.1.hook_resid_post": Evil()}, f)
    with pytest.raises(errors.VectorError, match="weights_only=True"):
        vectorset.load(p)


def test_validation_errors(tmp_path):
    with pytest.raises(errors.VectorError, match="hidden size is 32"):
        vectorset.VectorSet({1: torch.randn(16)}).validate(32, 4)
    bad = torch.randn(32)
    bad[3] = float("nan")
    with pytest.raises(errors.VectorError, match="NaN"):
        vectorset.VectorSet({1: bad}).validate(32, 4)
    with pytest.raises(errors.VectorError, match=r"no vector for layer\(s\) \[2\]"):
        vectorset.VectorSet({1: torch.randn(32)}).validate(32, 4, [1, 2])
    with pytest.raises(errors.VectorError, match="has 4 layers"):
        vectorset.VectorSet({9: torch.randn(32)}).validate(32, 4)


def test_truncated_and_missing_files(tmp_path):
    p = tmp_path / "v.safetensors"
    save_file({"layer.1": torch.randn(32)}, str(p))
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(errors.VectorError, match="cannot read safetensors"):
        vectorset.load(p)
    with pytest.raises(errors.VectorError, match="not found"):
        vectorset.load(tmp_path / "nope.safetensors")
    with pytest.raises(errors.VectorError, match="unsupported"):
        (tmp_path / "v.npy").write_bytes(b"x")
        vectorset.load(tmp_path / "v.npy")


def test_gguf_control_vector_round_trip_is_exact(tmp_path):
    from gguf import GGUFReader

    from steersweep.vectors.exchange import write_control_vector

    vs = vectorset.VectorSet({3: torch.randn(32), 7: torch.randn(32) * 1e-3}, "joy", {"model": "tiny"})
    p = write_control_vector(vs.vectors, tmp_path / "joy.gguf", "tiny")
    r = GGUFReader(str(p))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert sorted(t.name for t in r.tensors) == ["direction.3", "direction.7"]
    back = vectorset.load(p)
    assert set(back.vectors) == {3, 7}
    for layer in (3, 7):
        assert torch.equal(back.vectors[layer], vs.vectors[layer])
    with pytest.raises(ValueError, match="layer 0"):
        write_control_vector({0: torch.randn(32)}, tmp_path / "bad.gguf")


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
# File modes, pickles, the GGUF exchange


def test_vectors_file_follows_the_umask_like_the_rest(tiny_cli_run):
    _, run, _ = tiny_cli_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "vectors.safetensors", run / "manifest.json")}
    assert modes == {"vectors.safetensors": umask_mode(), "manifest.json": umask_mode()}


def test_pickle_refusal_is_ours(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"layer.1": Evil()}, tmp_path / "v.pt")
    with pytest.raises(errors.VectorError) as e:
        vectorset.load(tmp_path / "v.pt")
    msg = str(e.value)
    assert "\n" not in msg and "False" not in msg and "trusted source" not in msg, msg
    assert re.fullmatch(
        r"refused to load .*v\.pt with weights_only=True \(it pickles Python objects, not only tensors: \S*system\); "
        r"save plain tensors in a dict or use safetensors",
        msg,
    ), msg


def test_gguf_round_trip_keeps_concept_norms_and_ids(tmp_path):
    vs = vectorset.VectorSet(
        {3: torch.randn(32), 7: torch.randn(32)}, "joy", {"model": "tiny", "method": "pca_diff"}, {3: 1.5, 7: 2.25}
    )
    vectorset.save(vs, tmp_path / "v.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for args in (["export", "v.safetensors", "some name.gguf"], ["import", "some name.gguf", "back.safetensors"]):
        r = subprocess.run([sys.executable, "-m", "steersweep.vectors.exchange", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
    for path in (tmp_path / "some name.gguf", tmp_path / "back.safetensors"):
        back = vectorset.load(path)
        assert back.concept == "joy" and back.resid_norms == {3: 1.5, 7: 2.25} and back.method == "pca_diff"
        assert [back.vector_id(k) for k in (3, 7)] == [vs.vector_id(3), vs.vector_id(7)]
        assert back.meta["model"] == "tiny"
