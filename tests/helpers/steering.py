"""The injection modes written out plainly on one hidden state: the reference hooks, generation and
scoring are checked against."""

from __future__ import annotations

import torch


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
