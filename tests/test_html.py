"""report/index.html in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

The tables come from real sweeps (a tiny random Llama with the embedded model's tokenizer, through
the real conductor and Parquet writer) and from the real writer with hostile text; the page is
opened from disk as a user would open it, with no server and no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import websocket
from helpers.checkout import ROOT
from helpers.models import tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "</script><script>window.pwned = 1</script> <!-- & <b>bold</b>"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        msg = "no chromium on PATH: `make setup` installs Debian's chromium"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort in 120 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        yield Page(ws)
        ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Page:
    """The few DevTools protocol calls the tests need, with every console error kept."""

    def __init__(self, ws: websocket.WebSocket):
        self.ws, self.n, self.events = ws, 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _recv(self) -> dict:
        msg = json.loads(self.ws.recv())
        if "method" in msg:
            self.events.append(msg)
        return msg

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = self._recv()
            if msg.get("id") == self.n:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", url=path.as_uri())
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._recv()

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def errors(self) -> list:
        out = []
        for e in self.events:
            p = e["params"]
            if e["method"] == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"])
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(p["args"])
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"])
        return out

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the middle of the element."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        assert box is not None, selector
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path


def choose(page: Page, select_id: str, value: str) -> None:
    page.js(
        f"(() => {{ const s = document.getElementById({json.dumps(select_id)}); s.value = {json.dumps(value)};"
        " s.dispatchEvent(new Event('change')); })()"
    )


# ---------------------------------------------------------------------------------------------
# Real sweeps on a tiny random Llama


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_dir):
    """Two real sweeps (different alphas) of a tiny Llama that speaks the embedded tokenizer."""
    import steersweep as ss

    tmp = tmp_path_factory.mktemp("report-html")
    model_dir = tiny_checkpoint(tmp / "tiny model", embedded_dir)
    common = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=3",
              "generation.max_new_tokens=8", "eval.behavior_limit=4", "steering.layers=[1,2]", "progress=false"]  # fmt: skip
    dirs = []
    for name, alphas in (("run a", "[0,2,4]"), ("run b", "[0,-2]")):
        ss.Sweep.from_config(overrides=[*common, f"steering.alphas={alphas}"], run_dir=tmp / name).run()
        dirs.append(tmp / name)
    return dirs


def test_report_page_in_chromium(runs, browser, tmp_path):
    a, b = runs
    # the CLI route: task=report with another run compared (its own process, as a user runs it)
    r = subprocess.run(
        [sys.executable, "run_experiment.py", "task=report", f"run_dir='{a}'", f"report.compare_runs=['{b}']",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    index = a / "report" / "index.html"
    assert f"report written to {index}" in r.stdout  # the front page, not summary.md
    df = pd.read_parquet(a / "results.parquet")

    browser.open(index)
    assert browser.js("document.title") == "Steering sweep report: run a, run b"
    assert browser.errors() == []
    images = browser.js("[...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(images) == len(list((a / "report").glob("*.png"))) > 0
    assert all(done and width > 0 for done, width in images), images
    assert "run b" in browser.js("document.getElementById('compare').textContent")

    # pick the last prompt of run a, then click (layer 2, alpha 2) with the mouse
    choose(browser, "facet-run", "run b")
    assert browser.js("document.querySelectorAll(\"td.cell[data-alpha='-2']\").length") == 2  # layers 1 and 2
    choose(browser, "facet-run", "run a")
    assert browser.js("document.querySelectorAll(\"td.cell[data-alpha='-2']\").length") == 0  # b's alpha only
    last = sorted(df.prompt_id.unique())[-1]
    choose(browser, "prompt", last)
    browser.click("td.cell[data-layer='2'][data-alpha='2']")
    steered = browser.js("document.querySelector('#detail .steered .completion').textContent")
    unsteered = browser.js("document.querySelector('#detail .unsteered .completion').textContent")
    want = df[(df.prompt_id == last) & (df.layer == 2) & (df.alpha == 2.0) & (df["sample"] == 0)]
    base = df[(df.prompt_id == last) & (df.layer == 2) & (df.alpha == 0.0) & (df["sample"] == 0)]
    assert steered == want.completion.item() and unsteered == base.completion.item()
    assert steered != unsteered  # the page does not show one text twice
    shown = browser.js("[...document.querySelectorAll('#detail-columns th')].slice(3).map(t => t.textContent)")
    # unknown columns too; `layers` (the grid axis) is derived where a table has none
    assert set(shown) == set(df.columns) - {"completion", "prompt"} | {"run", "layers"}
    assert browser.errors() == []

    # the layer and alpha filters hide cells; the prompt filter narrows the choice
    browser.click("#layer-filter input[value='1']")
    assert browser.js("document.querySelectorAll(\"td.cell[data-layer='1']\").length") == 0
    assert browser.js("document.querySelectorAll(\"td.cell[data-layer='2']\").length") == 3
    browser.js("(() => { const s = document.getElementById('prompt-filter'); s.value = 'zzz-no-such';"
               " s.dispatchEvent(new Event('input')); })()")  # fmt: skip
    assert browser.js("document.getElementById('prompt').options.length") == 0
    browser.js("(() => { const s = document.getElementById('prompt-filter'); s.value = '';"
               " s.dispatchEvent(new Event('input')); })()")  # fmt: skip
    browser.click("#layer-filter input[value='1']")
    browser.click("td.cell[data-layer='1'][data-alpha='4']")
    browser.js("document.getElementById('browser').scrollIntoView()")
    shot = browser.screenshot(a / "report" / "browser-screenshot.png")
    assert shot.stat().st_size > 10_000
    assert browser.errors() == []


def test_hostile_text_stays_text(browser, tmp_path):
    """Completions holding `</script>`, HTML and odd numbers (NaN, inf) render as plain text."""
    from steersweep.reporting.write import write_report
    from steersweep.runs.folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.create()
    rows = [
        {"run_id": "r", "cell_id": f"c{layer}{alpha}", "model": "toy", "layer": layer, "alpha": alpha, "sample": 0,
         "prompt_id": "p0", "prompt": "<i>say</i> </script>", "completion": f"{HOSTILE} {layer} {alpha:g}",
         "perplexity": float("inf") if alpha else 3.0, "behavior_prob": float("nan"), "concept": "joy"}
        for layer in (1, 2) for alpha in (0.0, 2.0)
    ]  # fmt: skip
    folder.write_part(rows, "w")
    folder.merge()
    index = write_report(folder.path).parent / "index.html"
    assert "</script><script>window.pwned" not in index.read_text()

    browser.open(index)
    assert browser.errors() == []
    assert browser.js("typeof window.pwned") == "undefined"
    assert browser.js("document.getElementById('variant')") is None  # one variant: no variant filter
    browser.click("td.cell[data-layer='1'][data-alpha='2']")
    assert browser.js("document.querySelector('#detail .steered .completion').textContent") == f"{HOSTILE} 1 2"
    assert browser.js("document.querySelector('#detail .prompt').textContent") == "<i>say</i> </script>"
    cells = browser.js("[...document.querySelectorAll('#detail-columns tr')].map(r => r.textContent)")
    assert "perplexityinf3" in cells and "conceptjoyjoy" in cells
    assert browser.errors() == []


def test_variants_and_layer_sets_in_the_browser(browser, tmp_path):
    """Two methods x two modes x layer sets "10" and "10+14": a variant filter, and a click on a
    multi-layer cell shows that cell's completion beside alpha 0 of the same variant and layers."""
    from helpers.tables import variant_table

    from steersweep.reporting.write import write_report

    df = variant_table()
    # one (variant, layers) without alpha-0 rows: its baseline is another alpha-0 row of the prompt
    gone = (df.method == "mean_diff") & (df["mode"] == "add") & (df.layers == "10+14") & (df.alpha == 0)
    df = df[~gone].reset_index(drop=True)
    run = tmp_path / "run"
    run.mkdir()
    df.to_parquet(run / "results.parquet", index=False)
    index = write_report(run).parent / "index.html"

    browser.open(index)
    assert browser.errors() == []
    options = browser.js("[...document.querySelectorAll('#variant option')].map(o => o.textContent)")
    assert options == [f"sentiment · {m} · {k}" for m in ("mean_diff", "pca_diff") for k in ("ablate_add", "add")]
    assert browser.js("['facet-method', 'facet-mode', 'facet-concept', 'facet-layers']"
                      ".map(i => document.getElementById(i))") == [None] * 4  # fmt: skip
    assert browser.js("[...document.querySelectorAll('#grid tbody th')].map(t => t.textContent)") == ["10", "10+14"]
    assert browser.js("document.querySelectorAll('#best-per-variant tbody tr').length") == 4

    choose(browser, "variant", str(options.index("sentiment · pca_diff · ablate_add")))
    choose(browser, "prompt", "p2")
    browser.click("td.cell[data-layer='10+14'][data-alpha='2']")
    steered = browser.js("document.querySelector('#detail .steered .completion').textContent")
    unsteered = browser.js("document.querySelector('#detail .unsteered .completion').textContent")
    assert steered == "pca_diff/ablate_add/10+14/2/p2"
    assert unsteered == "pca_diff/ablate_add/10+14/0/p2"
    title = browser.js("document.querySelector('#detail .steered h3').textContent")
    assert title == "sentiment · pca_diff · ablate_add, layers 10+14, alpha 2"

    # the same cell of another variant; then one whose layer set has no alpha-0 row
    choose(browser, "variant", str(options.index("sentiment · mean_diff · add")))
    assert browser.js("document.querySelector('#detail .steered .completion').textContent") == (
        "mean_diff/add/10+14/2/p2"
    )
    assert browser.js("document.querySelector('#detail .unsteered .completion').textContent") == (
        "mean_diff/add/10/0/p2"
    )
    assert "layer 10" in browser.js("document.querySelector('#detail .unsteered h3').textContent")

    # the layer-set filter hides a row of the grid
    browser.click("#layer-filter input[value='10+14']")
    assert browser.js("document.querySelectorAll(\"td.cell[data-layer='10+14']\").length") == 0
    assert browser.js("document.querySelectorAll(\"td.cell[data-layer='10']\").length") == 5
    assert browser.errors() == []
