"""Metrics on completions (scoring.metrics) against independent computations, one row at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.steering import plain_mode

from steersweep.hooks.layers import get_layers
from steersweep.scoring.metrics import next_token_kl


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
