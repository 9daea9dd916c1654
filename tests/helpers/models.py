"""Tiny random Llamas: small enough for exact identities in milliseconds, and as checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(layers: int = 4, hidden: int = 32, vocab: int = 49152, seed: int = 0, dtype=torch.float32):
    """An untrained Llama small enough for exact identities in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 2
    return model


def tiny_checkpoint(folder: Path, embedded_dir: Path, model=None) -> Path:
    """A tiny random Llama saved as a checkpoint folder with the embedded model's real tokenizer
    (runs through the CLI or `ss.Sweep` with `model.path=<folder>`, `model.num_hidden_layers=4`)."""
    from transformers import AutoTokenizer

    (model if model is not None else tiny_llama()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(folder)
    return folder
