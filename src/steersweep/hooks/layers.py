"""A model's decoder layers: where they live in each architecture, and hook names for them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from steersweep.core.errors import LayerLookupError

# Module paths of the decoder layer list, tried in order (Llama, Mistral, Qwen, Gemma, Phi, OLMo,
# Mixtral: model.layers; GPT-2/GPT-J: transformer.h; NeoX: gpt_neox.layers; OPT: decoder.layers;
# multimodal wrappers: language_model).
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
)


def get_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the model's list of decoder layers.

    Args:
        model: a transformers causal LM (or any module holding a ModuleList of blocks).
        path: dotted attribute path that overrides auto-detection (config `model.layers_path`).
    """
    for candidate in (path,) if path else LAYER_PATHS:
        obj: object = model
        try:
            for part in candidate.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            if path:
                raise LayerLookupError(
                    f"model {type(model).__name__} has no attribute path '{path}': "
                    "fix model.layers_path (e.g. model.layers)"
                ) from None
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise LayerLookupError(
        f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(LAYER_PATHS)}): "
        "set model.layers_path=<dotted path to its nn.ModuleList of blocks>"
    )


def hook_name(layer: int | Sequence[int], label: str = "") -> str:
    """TransformerLens name of the residual stream after `layer` (what the steering hook edits); for a
    set of layers the names joined by "+", for the set `all` `blocks.*.hook_resid_post`."""
    if isinstance(layer, int):
        return f"blocks.{layer}.hook_resid_post"
    if label == "all":
        return "blocks.*.hook_resid_post"
    return "+".join(hook_name(x) for x in layer)
