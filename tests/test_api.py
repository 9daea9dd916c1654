"""The Python API (steersweep.api): the CLI's config, errors and rows; thin low-level helpers.

Fast: composing and validation errors (the CLI's one-line messages), the cheap import, reports of
DataFrames, and the low-level helpers on a tiny random Llama against the functions they wrap.
Slow: the README's Python blocks, run as written on a quick-sized grid, give the CLI's rows.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers.checkout import cli, readme_block

import steersweep as ss
from steersweep.api import compose, report
from steersweep.core.config import GenerationConfig
from steersweep.core.errors import USER_ERRORS, ConfigError, VectorError
from steersweep.generation.decode import generate_rows
from steersweep.hooks.layers import get_layers
from steersweep.inputs.datasets import load_behavior_items, load_pairs, load_prompts
from steersweep.inputs.encoding import encode_prompts, pad_id_of
from steersweep.runs.folder import table_from_rows
from steersweep.runs.identity import folder_for, identity, identity_hash
from steersweep.scoring import behavior
from steersweep.vectors.directions import compute_caa
from steersweep.vectors.vectorset import VectorSet

# the README's sweeps cut below experiment=quick size (2 prompts, 8 tokens, 8 behaviour items)
QUICK = ["prompts.limit=2", "generation.max_new_tokens=8", "eval.behavior_limit=8", "progress=false"]


# ---------------------------------------------------------------------------------------------
# Import, config, errors


def test_import_is_cheap():
    code = "import sys, steersweep; print(sorted({'torch', 'transformers', 'pandas', 'hydra'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_public_names_are_documented():
    assert ss.report is report.report  # the front door; tables and plots live in steersweep.reporting
    assert {"Sweep", "load", "steer", "steering", "report", "compute_vectors", "behavior_prob"} <= set(dir(ss))
    for name in ("Sweep", "load", "steer", "steering", "compute_vectors", "behavior_prob", "report", "compose_config"):
        fn = getattr(ss, name)
        assert fn.__doc__ and "Args" in (fn.compose.__doc__ if name == "Sweep" else fn.__doc__), name
    assert "alias" in ss.Sweep.from_config.__doc__


def test_every_user_error_is_a_steersweep_error_exported_at_the_top():
    assert all(issubclass(e, ss.SteersweepError) for e in USER_ERRORS)
    assert {e.__name__ for e in USER_ERRORS} <= set(ss.__all__)
    assert all(getattr(ss, e.__name__) is e for e in USER_ERRORS)
    with pytest.raises(ss.SteersweepError, match="steering.alpah"):
        ss.Sweep.compose(overrides=["steering.alpah=[1]"])


@pytest.mark.parametrize(
    "override",
    ["steering.alpah=[1]", "steering.layers=[99]", "experiment=nope", "steering.samples=3"],
)
def test_compose_errors_are_the_cli_lines(override, tmp_path):
    with pytest.raises(USER_ERRORS) as e:
        ss.Sweep.compose(overrides=[override])
    r = cli(override, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert f"error: {e.value}" in r.stderr.splitlines()
    assert "\n" not in str(e.value)


def test_compose_is_the_cli_config(tmp_path):
    run = ss.Sweep.compose(model="smollm2_135m", experiment="quick", overrides=["steering.alphas=[0,3]"])
    want = compose.compose_config(["model=smollm2_135m", "experiment=quick", "steering.alphas=[0,3]"])
    assert run.cfg == want
    assert ss.Sweep.from_config("smollm2_135m", ["steering.alphas=[0,3]"], "quick").cfg == want  # the alias
    assert ss.Sweep(want).cfg == want  # a composed config goes to the constructor
    assert list(run.cfg.steering.layers) == [10, 14] and list(run.cfg.steering.alphas) == [0.0, 3.0]
    assert run.run_dir == folder_for(want, identity_hash(identity(want)))  # results/<model-concept>-<hash>
    assert not run.run_dir.exists()  # nothing is claimed before run()
    here = ss.Sweep.compose(experiment="quick", run_dir=tmp_path / "r un")
    assert here.run_dir == tmp_path / "r un" and repr(here).startswith("Sweep(model=smollm2_135m, layers=[10, 14]")


def test_compose_refuses_other_tasks_and_wrong_models(tiny, tokenizer):
    with pytest.raises(ConfigError, match="a Sweep runs task=run"):
        ss.Sweep.compose(overrides=["task=report"])
    with pytest.raises(ConfigError, match="hidden_size=32 but model=smollm2_135m has 576"):
        ss.Sweep.compose(loaded=(tiny, tokenizer))
    like = SimpleNamespace(config=SimpleNamespace(hidden_size=576, num_hidden_layers=30, vocab_size=49152))
    other = compose.compose_config(["model.dtype=float16"]).model
    with pytest.raises(ConfigError, match="model.dtype=float16 \\(loaded\\)"):
        ss.Sweep.compose(loaded=compose.Loaded(like, tokenizer, {}, other))
    with pytest.raises(ConfigError, match="loaded= takes"):
        ss.Sweep.compose(loaded=tiny)


def test_override_values_are_quoted():
    assert compose._override_value("150GiB") == "'150GiB'"
    assert compose._override_value(0.8) == "0.8" and compose._override_value(True) == "true"
    assert compose._override_value(None) == "null" and compose._override_value([1, 2]) == "[1,2]"
    cfg = compose.compose_config([f"memory.cpu={compose._override_value('0')}", "memory.gpu_fraction=0.5"])
    assert cfg.memory.cpu == "0" and cfg.memory.gpu_fraction == 0.5


# ---------------------------------------------------------------------------------------------
# Reports


def results_frame(run_id: str = "toy-1234") -> pd.DataFrame:
    rows = [
        {"run_id": run_id, "cell_id": f"c{layer}{alpha}{p}", "model": "toy", "layer": layer, "alpha": alpha,
         "prompt_id": f"p{p}", "prompt": f"prompt {p}", "completion": f"text {layer} {alpha} {p}",
         "behavior_prob": 0.5 + 0.05 * alpha + 0.01 * p, "perplexity": 10 + alpha + p, "word_rate_positive": 0.1 * alpha}
        for layer in (1, 2) for alpha in (0.0, 2.0) for p in range(3)
    ]  # fmt: skip
    return table_from_rows(rows).to_pandas()


def test_report_of_a_dataframe_writes_what_task_report_writes(tmp_path, capsys):
    from steersweep.reporting.write import write_report

    df = results_frame()
    ref = tmp_path / "toy-1234"
    ref.mkdir()
    df.to_parquet(ref / "results.parquet", index=False)
    want = write_report(ref)

    rep = ss.report(df)  # not backed by a folder: a temporary one
    summary = rep.save(tmp_path / "mine")
    assert summary == tmp_path / "mine" / "summary.md"
    assert sorted(p.name for p in summary.parent.iterdir()) == sorted(p.name for p in want.parent.iterdir())
    assert summary.read_text() == want.read_text()
    rep.show()  # outside a notebook: the path
    assert f"report: {summary}" in capsys.readouterr().out


def test_report_of_a_run_dataframe_uses_its_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    df = results_frame()
    df.to_parquet(run / "results.parquet", index=False)
    df.attrs["run_dir"] = str(run)
    rep = ss.report(df, objective="word_rate_positive")
    assert rep.folder == run and rep.cfg.objective == "word_rate_positive"
    assert rep.save() == run / "report" / "summary.md"
    assert "By **word_rate_positive**" in (run / "report" / "summary.md").read_text()
    sub = df[df.alpha == 0]  # other rows than the folder's: reported from a folder of their own
    assert ss.report(sub).folder != run
    assert ss.report(run).folder == run
    with pytest.raises(ConfigError, match="unknown"):
        ss.report(df, objectve="x")
    with pytest.raises(ConfigError, match="does not exist: set run_dir"):
        ss.report(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Low-level helpers on a tiny random Llama (vocabulary of the embedded tokenizer)

PROMPTS = ["Tell me about your weekend.", "Describe the sea.", "What is a good breakfast?"]


def test_compute_vectors_wraps_compute_caa(tiny, tokenizer):
    pairs = [("I love this.", "I hate this."), ("What a joy!", "What a misery!")]
    vs = ss.compute_vectors(tiny, tokenizer, pairs, layers=[1, 3], concept="joy")
    ref = compute_caa(tiny, tokenizer, [{"positive": a, "negative": b} for a, b in pairs], [1, 3], "joy")
    assert isinstance(vs, VectorSet) and vs.concept == "joy" and sorted(vs.vectors) == [1, 3]
    assert all(torch.equal(vs.vectors[k], ref.vectors[k]) for k in (1, 3))
    named = ss.compute_vectors(tiny, tokenizer, "sentiment_pairs", 2)
    assert torch.equal(
        named.vectors[2], compute_caa(tiny, tokenizer, load_pairs("sentiment_pairs"), [2], "c").vectors[2]
    )
    with pytest.raises(VectorError, match="pair 0"):
        ss.compute_vectors(tiny, tokenizer, ["just one text"], [1])


def test_steer_is_generate_rows_with_per_row_settings(tiny, tokenizer):
    v = {1: torch.randn(32) * 4, 2: torch.randn(32) * 4}
    layers, alphas = [1, 2, 1], [3.0, -2.0, 0.0]
    got = ss.steer(tiny, tokenizer, PROMPTS, layers, alphas, v, max_new_tokens=6)
    gen = GenerationConfig(max_new_tokens=6)
    ids = encode_prompts(tokenizer, PROMPTS, gen)
    ref = generate_rows(tiny, tokenizer, ids, [(ly, a, v[ly]) for ly, a in zip(layers, alphas, strict=True)], gen)
    assert got == [c.text for c in ref]
    for i in range(3):  # each row as if alone, in batches of one
        assert ss.steer(tiny, tokenizer, PROMPTS[i], layers[i], alphas[i], v, 6) == [got[i]]
    assert ss.steer(tiny, tokenizer, PROMPTS, 1, 0.0, v[1], 6, batch_size=2) == ss.steer(
        tiny, tokenizer, PROMPTS, 2, 0.0, v[2], 6
    )  # alpha 0 is the unsteered model whatever the vector
    s1 = ss.steer(tiny, tokenizer, PROMPTS, 1, 2.0, v, 6, do_sample=True, seed=3)
    s2 = ss.steer(tiny, tokenizer, PROMPTS[::-1], 1, 2.0, v, 6, do_sample=True, seed=3, batch_size=1)
    assert s1 == s2[::-1]  # a row samples alike in any batch
    with pytest.raises(ConfigError, match="out of range"):
        ss.steer(tiny, tokenizer, PROMPTS, 4, 1.0, v, 6)
    with pytest.raises(VectorError, match="no vector for layer 3"):
        ss.steer(tiny, tokenizer, PROMPTS, 3, 1.0, v, 6)
    with pytest.raises(ConfigError, match="3 rows but 2 layers"):
        ss.steer(tiny, tokenizer, PROMPTS, [1, 2], 1.0, v, 6)


def own_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """A notebook's own `generate` call on the prompts `steer` encodes (chat template, left padding)."""
    from steersweep.generation.decode import left_pad

    pad = tokenizer.pad_token_id
    ids, mask = left_pad(encode_prompts(tokenizer, prompts, GenerationConfig(max_new_tokens=6)), pad)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def hooks_left(model) -> int:
    return sum(len(layer._forward_hooks) for layer in get_layers(model))


def test_steering_steers_a_models_own_generate_as_steer_does(tiny, tokenizer):
    v = {1: torch.randn(32) * 4, 2: torch.randn(32) * 4}
    plain = own_generate(tiny, tokenizer, PROMPTS, 6)
    with ss.steering(tiny, v, layer=2, alpha=3.0):  # one setting: every row of the batch
        one = own_generate(tiny, tokenizer, PROMPTS, 6)
    assert one == ss.steer(tiny, tokenizer, PROMPTS, 2, 3.0, v, 6) and one != plain
    assert hooks_left(tiny) == 0 and own_generate(tiny, tokenizer, PROMPTS, 6) == plain
    layers, alphas = [1, 2, 1], [3.0, -2.0, 0.0]
    with ss.steering(tiny, v, layer=layers, alpha=alphas):  # per-row settings, as in a sweep's batch
        rows = own_generate(tiny, tokenizer, PROMPTS, 6)
    assert rows == ss.steer(tiny, tokenizer, PROMPTS, layers, alphas, v, 6) and rows[2] == plain[2]
    with ss.steering(tiny, v, layer=1, alpha=[2.0, 0.0, -1.0], mode="ablate_add"):  # one list sets the rows
        modes = own_generate(tiny, tokenizer, PROMPTS, 6)
    assert modes == ss.steer(tiny, tokenizer, PROMPTS, 1, [2.0, 0.0, -1.0], v, 6, mode="ablate_add")
    with ss.steering(tiny, v[1], layer=1, alpha=2.0, positions="generated"):  # one generate per block
        late = own_generate(tiny, tokenizer, PROMPTS, 6)
    assert late == ss.steer(tiny, tokenizer, PROMPTS, 1, 2.0, v[1], 6, positions="generated")
    assert hooks_left(tiny) == 0


def test_steering_removes_its_hooks_and_refuses_what_it_cannot_do(tiny, tokenizer):
    v = {1: torch.randn(32)}
    with pytest.raises(KeyboardInterrupt):
        with ss.steering(tiny, v, layer=1, alpha=2.0):
            assert hooks_left(tiny) == 1
            raise KeyboardInterrupt
    assert hooks_left(tiny) == 0
    with pytest.raises(RuntimeError, match="batch of 3 rows but was built for 2"):
        with ss.steering(tiny, v, layer=[1, 1], alpha=[1.0, 2.0]):  # two settings, three rows
            own_generate(tiny, tokenizer, PROMPTS, 2)
    assert hooks_left(tiny) == 0
    with pytest.raises(ss.ConfigError, match="layer has 2 values and alpha 3: give one value, or one per batch row"):
        with ss.steering(tiny, v, layer=[1, 1], alpha=[1.0, 2.0, 3.0]):
            pass
    with pytest.raises(ss.VectorError, match="no vector for layer 2"):
        with ss.steering(tiny, v, layer=2, alpha=1.0):
            pass
    with pytest.raises(ss.ConfigError, match="use steersweep.steer"):
        with ss.steering(tiny, v, layer=1, alpha=1.0, positions="from:2"):
            pass
    assert hooks_left(tiny) == 0


def test_steer_backs_off_on_out_of_memory(tiny, tokenizer, monkeypatch):
    """A batch that does not fit is halved and retried: same completions, in order, none lost."""
    from steersweep.generation import decode as G

    v = {1: torch.randn(32) * 4}
    want = ss.steer(tiny, tokenizer, PROMPTS, 1, 2.0, v, 5)
    real, sizes = G.generate_rows, []

    def small_memory(model, tok, ids, *a, **kw):
        sizes.append(len(ids))
        if len(ids) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tok, ids, *a, **kw)

    monkeypatch.setattr(G, "generate_rows", small_memory)
    assert ss.steer(tiny, tokenizer, PROMPTS, 1, 2.0, v, 5, batch_size=4) == want
    assert sizes[:3] == [3, 2, 1] and len(sizes) == 5


def test_behavior_prob_is_the_metric(tiny, tokenizer):
    items = load_behavior_items("sentiment_continuations", "continuation")[:6]
    v = torch.randn(32) * 4
    got = ss.behavior_prob(tiny, tokenizer, items, 2, 3.0, {2: v})
    enc = behavior.encode_behavior_items(tokenizer, items, "continuation", True)
    ref = behavior.behavior_probs(tiny, enc, [(2, 3.0, v)], pad_id_of(tokenizer))[0][0]
    assert got == ref and 0 < got < 1
    assert ss.behavior_prob(tiny, tokenizer, "sentiment_continuations", 2, 3.0, v, limit=6) == got
    base = ss.behavior_prob(tiny, tokenizer, items, 1, 0.0, v)
    assert base == ss.behavior_prob(tiny, tokenizer, items, 3, 0.0, v * 7) != got


# ---------------------------------------------------------------------------------------------
# Slow: the README blocks as written, on the embedded model, against the CLI


class Recorder:
    """Patches Sweep.compose (and so its alias from_config) to cut the grid to quick size and aim it at
    a test folder."""

    def __init__(self, mp: pytest.MonkeyPatch, run_dirs):
        self.calls: list[inspect.BoundArguments] = []
        self.run_dirs = iter(run_dirs)
        orig = ss.Sweep.compose.__func__
        sig = inspect.signature(orig)

        def patched(cls, *args, **kwargs):
            b = sig.bind(cls, *args, **kwargs)
            b.apply_defaults()
            self.calls.append(b)
            b.arguments["overrides"] = [*b.arguments["overrides"], *QUICK]
            b.arguments["run_dir"] = next(self.run_dirs)
            return orig(*b.args, **b.kwargs)

        mp.setattr(ss.Sweep, "compose", classmethod(patched))

    @staticmethod
    def cli_args(b: inspect.BoundArguments) -> list[str]:
        a = b.arguments
        return [
            *([f"model={a['model']}"] if a["model"] else []),
            *([f"experiment={a['experiment']}"] if a["experiment"] else []),
            *a["overrides"],
            *QUICK,
        ]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """README block 1 run as written (grid cut to quick size), and the CLI on the same config."""
    tmp = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp, [tmp / "api"])
        ns: dict = {}
        exec(compile(readme_block("python-api"), "README.md", "exec"), ns)
    (call,) = rec.calls
    args = Recorder.cli_args(call)
    r = cli(*args, f"run_dir={tmp / 'cli'}", f"hydra.run.dir={tmp / 'hydra'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(ns=ns, call=call, args=args, tmp=tmp, cli=pd.read_parquet(tmp / "cli" / "results.parquet"))


def same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert sorted(got.cell_id) == sorted(want.cell_id)
    g, w = got.set_index("cell_id").sort_index(), want.set_index("cell_id").sort_index()
    assert (g.completion == w.completion).all()
    for col in ("layer", "alpha", "prompt_id", "vector_id", "batch_id", "n_new_tokens"):
        assert (g[col] == w[col]).all(), col
    for col in ("behavior_prob", "perplexity", "word_rate_positive", "distinct_1"):
        assert g[col].to_numpy() == pytest.approx(w[col].to_numpy(), rel=1e-6, nan_ok=True), col


@pytest.mark.slow
def test_readme_block_gives_the_cli_rows_and_resumes(readme_run):
    ns, tmp = readme_run.ns, readme_run.tmp
    df, run = ns["df"], ns["run"]
    assert run.run_dir == tmp / "api" and df.attrs["run_dir"] == str(tmp / "api")
    assert len(df) == 2 * 2 * 2 and run.summary["written"] == len(df)
    same_rows(df, readme_run.cli)
    assert (tmp / "api" / "report" / "summary.md").is_file()
    again = run.run()  # resumes: nothing regenerated
    assert run.summary["written"] == 0
    pd.testing.assert_frame_equal(again, df)


@pytest.mark.slow
def test_readme_lower_block_and_a_loaded_model_reproduce_the_cli(readme_run, monkeypatch):
    """Block 2's sweep (experiment=quick, cut to the same size) is block 1's config: on the loaded
    model it gives the CLI's rows, and the helpers give the sweep's vectors, completions, scores."""
    tmp = readme_run.tmp
    Recorder(monkeypatch, [tmp / "lower"])
    ns: dict = {"ss": ss}
    exec(compile(readme_block("python-api-lower"), "README.md", "exec"), ns)
    monkeypatch.undo()
    loaded, model, tok, df2 = ns["loaded"], ns["model"], ns["tok"], ns["df2"]
    assert isinstance(loaded, compose.Loaded) and loaded.info["path"]
    assert len(ns["texts"]) == 2 and all(isinstance(x, str) for x in ns["texts"]) and 0 < ns["p"] < 1
    plan = json.loads((tmp / "cli" / "plan.json").read_text())
    assert json.loads((tmp / "lower" / "plan.json").read_text())["identity_hash"] == plan["identity_hash"]
    same_rows(df2, readme_run.cli)

    cfg = readme_run.ns["run"].cfg
    manifest = json.loads((tmp / "cli" / "manifest.json").read_text())
    vs = ns["vs"]
    for layer in cfg.steering.layers:
        assert vs.sha256(layer) == manifest["vectors"][str(layer)]["sha256"]
    prompts = load_prompts(cfg.prompts.dataset, cfg.prompts.limit)
    grid = [(p, ly, a) for p in prompts for ly in cfg.steering.layers for a in cfg.steering.alphas]  # plan order
    texts = ss.steer(model, tok, [p["prompt"] for p, _, _ in grid], [ly for _, ly, _ in grid],
                     [a for _, _, a in grid], vs, cfg.generation.max_new_tokens)  # fmt: skip
    cli_df = readme_run.cli
    for (p, ly, a), text in zip(grid, texts, strict=True):
        row = cli_df[(cli_df.prompt_id == p["id"]) & (cli_df.layer == ly) & (cli_df.alpha == a)]
        assert row.completion.item() == text, (p["id"], ly, a)
    ly, a = cfg.steering.layers[0], cfg.steering.alphas[-1]
    want = cli_df[(cli_df.layer == ly) & (cli_df.alpha == a)].behavior_prob.iloc[0]
    got = ss.behavior_prob(model, tok, cfg.eval.behavior_dataset, ly, a, vs, limit=cfg.eval.behavior_limit)
    # one setting scored alone, where the sweep scored its settings side by side: another batch. Exact in
    # float32 (to its last digits); in bf16 (what auto picks on AVX512-BF16/AMX CPUs) the kernels depend on the
    # batch's shape, so it agrees to bf16's precision: 8 significant bits, one unit in the last place = 2^-7
    used = manifest["dtype"]["used"]
    assert got == pytest.approx(want, rel=1e-6 if used == "float32" else 2**-7), used


def test_a_sweep_starts_inside_a_hydra_app(tiny, embedded_dir, tmp_path):
    """A researcher's own @hydra.main script (Hydra already global) runs a sweep: the config is
    composed beside the app's Hydra, which is put back after."""
    from helpers.models import tiny_checkpoint

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    script = tmp_path / "my_app.py"
    script.write_text(
        "import hydra\n"
        "from hydra.core.global_hydra import GlobalHydra\n"
        "import steersweep as ss\n\n"
        "@hydra.main(version_base='1.3', config_path=None, config_name=None)\n"
        "def main(cfg):\n"
        "    mine = GlobalHydra.instance().hydra\n"
        f"    run = ss.Sweep.compose(overrides=['model.path={model_dir}', 'model.num_hidden_layers=4',\n"
        "        'prompts.limit=2', 'steering.layers=[1]', 'steering.alphas=[0,2]', 'generation.max_new_tokens=4',\n"
        f"        'eval.metrics=[]', 'report.enabled=false', 'progress=false'], run_dir={str(tmp_path / 'run')!r})\n"
        "    print('rows', len(run.run()), GlobalHydra.instance().hydra is mine)\n\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rows 4 True" in r.stdout, r.stderr[-2000:]
