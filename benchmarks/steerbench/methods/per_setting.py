"""(c) What users of the steering-vectors library get: one `generate` call per (layer, alpha).

`SteeringVector(...).apply(model, multiplier=alpha)` around `model.generate` with that setting's
prompts batched. Always the library itself (installed by `make setup`, --no-deps: it declares
transformers<5 but runs on 5.x); there is no stand-in.
"""

from __future__ import annotations

import torch

from ..machine import timed
from ..workload import Method, Workload


class LibraryMissing(RuntimeError):
    """steering-vectors does not import."""


def library():
    """The steering_vectors module, or LibraryMissing with what to do."""
    try:
        import steering_vectors
    except Exception as e:  # ImportError, or one of its imports (scikit-learn) missing
        raise LibraryMissing(
            f"steering-vectors does not import ({type(e).__name__}: {e}): run `make setup`, which installs "
            "steering-vectors==0.12.2 --no-deps with scikit-learn and the rest it imports"
        ) from e
    return steering_vectors


def version() -> str:
    from importlib.metadata import version as v

    return v("steering-vectors")


def run(model, tok, w: Workload, device: torch.device, only: list[int] | None = None) -> Method:
    """Every (layer, alpha) setting, or those whose cells are in `only`."""
    from steersweep.generation.decode import left_pad
    from steersweep.inputs.encoding import pad_id_of

    sv_lib = library()
    m = Method("per_setting", f"steering-vectors {version()} SteeringVector.apply + model.generate")
    pad = pad_id_of(tok)
    dtype = next(model.parameters()).dtype
    forced = model.generation_config.min_new_tokens  # the main workload's exactly-T tokens

    def call(group: list[int], n_new: int) -> list[list[int]]:
        layer, alpha, v = w.steering(group)[0]
        sv = sv_lib.SteeringVector(
            layer_activations={layer: v.to(device=device, dtype=dtype)}, layer_type="decoder_block"
        )
        input_ids, mask = left_pad(w.ids(group), pad)
        with torch.inference_mode(), sv.apply(model, multiplier=alpha):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_new,
                min_new_tokens=n_new if forced else None, do_sample=False, pad_token_id=pad, use_cache=True,
            )  # fmt: skip
        return out[:, input_ids.shape[1] :].cpu().tolist()

    groups = [g for g in w.settings() if only is None or g[0] in only]
    call(groups[0], 2)  # warm-up
    for group in groups:
        outs, s = timed(lambda group=group: call(group, w.tokens), device)
        m.add(group, outs, s)
    return m
