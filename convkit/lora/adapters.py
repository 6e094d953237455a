"""Adapter arithmetic in fp32: ΔW of LoRA (incl. Tucker), LoHa, LoKr and full diffs; DoRA.

ΔW follows kohya/LyCORIS/ComfyUI: LoRA ``up @ down * alpha/rank`` (alpha defaults to the rank),
LoHa ``(w1a@w1b) * (w2a@w2b) * alpha/rank``, LoKr ``kron(w1, w2) * alpha/rank`` (1 when neither
factor is low-rank), ``diff`` as stored.
"""
from __future__ import annotations

import torch

from .formats import Adapter, LoraFile
from .table import Unit


def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    # LyCORIS: einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)
    return torch.einsum("ijkl,jr,ip->prkl", t, wb.flatten(1), wa.flatten(1))


def delta(ad: Adapter, lf: LoraFile, unit: Unit, rows: slice | None = None) -> torch.Tensor:
    """ΔW (times alpha/rank, not times the user weight) in the unit's shape, fp32.

    ``rows`` restricts a plain LoRA to some output rows (cheap: only those rows of ``up``).
    """
    L = lambda role: lf.load(ad, role)  # noqa: E731
    scale = ad.scale(lf.source)
    shape = unit.shape
    if ad.algo == "lora":
        up, down = L("up"), L("down")
        if rows is not None:
            up = up[rows]
        if "mid" in ad.keys:
            mid = L("mid")
            down = torch.einsum("ajkl,ji->aikl", mid, down.flatten(1))
        d = up.flatten(1) @ down.flatten(1)
        out_shape = (d.shape[0], *shape[1:])
        return (d * scale).reshape(out_shape)
    if ad.algo == "full":
        d = L("diff").reshape(shape)
    elif ad.algo == "loha":
        if "t1" in ad.keys:
            m1 = _tucker(L("t1"), L("w1b"), L("w1a"))
            m2 = _tucker(L("t2"), L("w2b"), L("w2a"))
        else:
            m1 = L("w1a") @ L("w1b").flatten(1)
            m2 = L("w2a") @ L("w2b").flatten(1)
        d = (m1 * m2 * scale).reshape(shape)
    elif ad.algo == "lokr":
        w1 = L("w1") if "w1" in ad.keys else L("w1a") @ L("w1b")
        if "w2" in ad.keys:
            w2 = L("w2")
        elif "t2" in ad.keys:
            w2 = _tucker(L("t2"), L("w2b"), L("w2a"))
        else:
            w2 = L("w2a") @ L("w2b").flatten(1)
        if w2.ndim == 4:  # a 2-D kron of the flattened factor gives the same numbers
            w1 = w1.unsqueeze(2).unsqueeze(3)
        d = (torch.kron(w1, w2) * scale).reshape(shape)
    else:  # pragma: no cover - validated earlier
        raise ValueError(ad.algo)
    return d if rows is None else d[rows]


def bias_delta(ad: Adapter, lf: LoraFile) -> torch.Tensor | None:
    return lf.load(ad, "diff_b") if "diff_b" in ad.keys else None


def dora_weight(ad: Adapter, lf: LoraFile, w: torch.Tensor, d: torch.Tensor,
                strength: float) -> torch.Tensor:
    """The new weight of a DoRA module: ``w`` the unit weight, ``d`` the scaled ΔW (fp32).

    kohya/LyCORIS ``dora_scale`` (output or input axis, told by its shape): W' = m·(W+ΔW)/‖W+ΔW‖,
    applied with strength s as W + s·(W' − W) (as ComfyUI/Forge do).
    PEFT ``lora_magnitude_vector``: W' = m·(W+sΔW)/‖W+sΔW‖ per output row (as PEFT merges).
    """
    if ad.dora == "peft":
        m = lf.load(ad, "magnitude").reshape(-1)
        wc = w + strength * d
        norm = wc.reshape(wc.shape[0], -1).norm(dim=1)
        return wc * (m / norm).reshape(-1, *[1] * (w.ndim - 1))
    m = lf.load(ad, "dora")
    wc = w + d
    if m.numel() == w.shape[0] and (m.ndim == 1 or m.shape[0] == w.shape[0]):
        norm = wc.reshape(wc.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w.shape[0], *[1] * (w.ndim - 1))
        m = m.reshape(norm.shape)
    else:
        norm = wc.transpose(0, 1).reshape(wc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(wc.shape[1], *[1] * (w.ndim - 1)).transpose(0, 1)
        m = m.reshape(norm.shape)
    new = wc * (m / norm)
    return w + strength * (new - w)


# ----------------------------------------------------------------- keymap transforms on deltas

def to_base(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    """diffusers form -> single-file form (the keymap's forward transform)."""
    if transform is None:
        return t
    if transform == "transpose":
        return t.t()
    if transform == "conv1x1":
        return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
    if transform == "swap_halves":
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    raise ValueError(transform)


def to_diffusers(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    if transform == "conv1x1":
        return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
    return to_base(transform, t)
