"""Writing LoRA files in the kohya, ComfyUI and diffusers/PEFT formats (formats/lora/writers.toml).

:class:`OutModule` is one module's adapter tensors in memory; :func:`relabel` re-expresses modules
in the module names a format uses (fusing diffusers q/k/v LoRAs into one single-file LoRA by
stacking, or splitting a fused one by rows: both exact); :func:`write_lora` writes the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..errors import UsageError, raise_all
from ..writer import OutSpec, SafetensorsWriter, check_output
from .data import FORMATS, keys_data, writers_data
from .table import ModuleTable, Unit

LOSSY_NOTE = "LoHa/LoKr/Tucker/full modules cannot be written as plain LoRA"


@dataclass
class OutModule:
    unit: Unit
    algo: str                                  # lora | loha | lokr | full
    tensors: dict[str, torch.Tensor]           # role -> tensor (roles as in keys.toml)
    alpha: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        if self.algo == "lora":
            return self.tensors["down"].shape[0]
        if self.algo == "loha":
            return self.tensors["w1b"].shape[0]
        return None

    def scale(self) -> float:
        r = self.rank
        return 1.0 if self.alpha is None or not r else self.alpha / r


def format_spec(fmt: str) -> dict:
    data = writers_data()
    if fmt not in FORMATS:
        from ..errors import UnknownNameError
        raise UnknownNameError("LoRA format", fmt, FORMATS)
    return data[fmt]


def naming(fmt: str, arch: str, component: str) -> tuple[str, str, str]:
    """(prefix, space "single"|"diffusers", style) a format uses for one component."""
    names = format_spec(fmt)["names"].get(arch)
    if not names or component not in names:
        raise UsageError(f"the {fmt} format has no names for {arch} {component}")
    return tuple(names[component])


def _lycoris_suffix() -> dict[str, str]:
    out = {}
    for suf, info in keys_data()["suffix"].items():
        if info.get("algo") in ("loha", "lokr", "full"):
            out.setdefault(info["role"], suf)
    return out


# ----------------------------------------------------------------- relabel (fuse / split)

def _single_unit_of(table: ModuleTable, unit: Unit) -> Unit | None:
    for u in table.single_units(unit.component):
        if unit.parts[0] in u.parts:
            return u
    return None


def relabel(mods: list[OutModule], table: ModuleTable, fmt: str) -> tuple[list[OutModule], list[str]]:
    """Modules named as ``fmt`` wants (single-file or diffusers module names); notes on changes."""
    out: list[OutModule] = []
    notes: list[str] = []
    pending: dict[int, tuple[Unit, dict[str, OutModule]]] = {}
    for m in mods:
        _, space, _ = naming(fmt, table.arch, m.unit.component)
        if m.unit.space == space or (space == "single" and m.unit.space == "diffusers"
                                     and _single_unit_of(table, m.unit) is None):
            out.append(m)
        elif space == "diffusers":
            out += _split(m, table)
        else:
            su = _single_unit_of(table, m.unit)
            if len(su.parts) == 1:
                out.append(OutModule(su, m.algo, _moved(m, su.transform, True), m.alpha))
            else:
                pending.setdefault(id(su), (su, {}))[1][m.unit.parts[0]] = m
    for su, got in pending.values():
        out.append(_fuse(su, got, notes))
    return out, notes


def _split(m: OutModule, table: ModuleTable) -> list[OutModule]:
    u = m.unit
    if len(u.parts) == 1:
        du = table.units[(u.component, u.parts[0])]
        return [OutModule(du, m.algo, _moved(m, u.transform, False), m.alpha)]
    if m.algo not in ("lora", "full") or "mid" in m.tensors or u.transform:
        raise UsageError(f"cannot split the {m.algo} module '{u.name}' into "
                         f"{len(u.parts)} diffusers modules without loss")
    res, start = [], 0
    for part, size in zip(u.parts, u.sizes):
        du = table.units[(u.component, part)]
        if m.algo == "lora":
            t = {"up": m.tensors["up"][start:start + size], "down": m.tensors["down"]}
        else:
            t = {"diff": m.tensors["diff"].reshape(u.shape)[start:start + size]}
        res.append(OutModule(du, m.algo, t, m.alpha))
        start += size
    return res


def _moved(m: OutModule, transform: str | None, to_single: bool) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``m`` after the keymap transform between the two namings."""
    from .adapters import to_base, to_diffusers

    t = dict(m.tensors)
    if transform in (None, "conv1x1"):
        return t                     # same numbers; shapes are reshaped when merged
    if "dora" in t or "magnitude" in t or m.algo not in ("lora", "full"):
        raise UsageError(f"cannot move a {m.algo} module across the '{transform}' transform "
                         f"({m.unit.name})")
    f = to_base if to_single else to_diffusers
    if m.algo == "full":
        t["diff"] = f(transform, t["diff"].reshape(m.unit.shape))
    elif transform == "transpose":
        t["up"], t["down"] = t["down"].t().contiguous(), t["up"].t().contiguous()
    else:
        t["up"] = f(transform, t["up"]).contiguous()
    return t


def _fuse(su: Unit, got: dict[str, OutModule], notes: list[str]) -> OutModule:
    """Stack per-part LoRAs into one LoRA of the fused tensor: exact, rank = sum of ranks."""
    if any(m.algo != "lora" or "mid" in m.tensors or "dora" in m.tensors or "magnitude" in m.tensors
           for m in got.values()):
        raise UsageError(f"cannot fuse non-LoRA modules into '{su.name}'")
    ups, downs = [], []
    any_m = next(iter(got.values()))
    in_dim = any_m.tensors["down"].shape[1:]
    total_r = sum(m.rank for m in got.values())
    col = 0
    for part, size in zip(su.parts, su.sizes):
        m = got.get(part)
        up = torch.zeros(size, total_r, *any_m.tensors["up"].shape[2:], dtype=torch.float32)
        if m is not None:
            r = m.rank
            up[:, col:col + r] = m.tensors["up"].float() * m.scale()
            downs.append(m.tensors["down"].float())
            col += r
        ups.append(up)
    notes.append(f"{su.name}: {len(got)} LoRAs stacked into one of rank {total_r}")
    down = torch.cat(downs, 0).reshape(total_r, *in_dim)
    return OutModule(su, "lora", {"up": torch.cat(ups, 0), "down": down}, float(total_r))


# ----------------------------------------------------------------- write

def tensors_for(m: OutModule, fmt: str, arch: str) -> dict[str, torch.Tensor]:
    spec = format_spec(fmt)
    prefix, _, style = naming(fmt, arch, m.unit.component)
    name = m.unit.name.replace(".", "_") if style == "underscore" else m.unit.name
    base = prefix + name
    out: dict[str, torch.Tensor] = {}
    if m.algo != "lora" and not spec.get("lycoris"):
        raise UsageError(f"{LOSSY_NOTE} in the {fmt} format ({m.algo}: {m.unit.name})",
                         hint="use --format kohya or comfy, which keep LyCORIS modules")
    if m.algo == "lora":
        up = m.tensors["up"]
        if spec.get("fold_alpha"):
            if "mid" in m.tensors:
                raise UsageError(f"Tucker LoCon ('{m.unit.name}') has no {fmt} form",
                                 hint="use --format kohya or comfy")
            up = up.float() * m.scale()
        out[base + spec["down"]] = m.tensors["down"]
        out[base + spec["up"]] = up
        if "mid" in m.tensors:
            out[base + spec["mid"]] = m.tensors["mid"]
        if "alpha" in spec:
            out[base + spec["alpha"]] = torch.tensor(float(m.alpha if m.alpha is not None
                                                           else m.rank))
    else:
        suf = _lycoris_suffix()
        for role, t in m.tensors.items():
            if role in suf:
                out[base + suf[role]] = t
        if m.alpha is not None and "alpha" in spec:
            out[base + spec["alpha"]] = torch.tensor(float(m.alpha))
    if "dora" in m.tensors:
        if "dora" not in spec:
            raise UsageError(f"kohya/LyCORIS DoRA scales have no {fmt} form ({m.unit.name})")
        out[base + spec["dora"]] = m.tensors["dora"]
    if "magnitude" in m.tensors:
        if "magnitude" in spec:
            out[base + spec["magnitude"]] = m.tensors["magnitude"]
        else:  # PEFT magnitude (out,) -> kohya output-axis dora_scale (out, 1, ...)
            mag = m.tensors["magnitude"]
            out[base + spec["dora"]] = mag.reshape(mag.shape[0], *[1] * (len(m.unit.shape) - 1))
    return out


def write_lora(path: str | os.PathLike, arch: str, mods: list[OutModule], fmt: str, *,
               dtype: str | None = None, metadata: dict[str, str] | None = None,
               overwrite: bool = False, inputs=()) -> Path:
    """Write ``mods`` (already in the format's naming, see :func:`relabel`) to one safetensors."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        for k, t in tensors_for(m, fmt, arch).items():
            if k in tensors:
                raise UsageError(f"two modules write the same tensor '{k}'")
            tensors[k] = t
    from ..casts import CAST_TARGET

    if dtype and dtype not in CAST_TARGET:
        raise UsageError(f"unknown LoRA dtype '{dtype}' (fp16, bf16, fp32)")
    tdt = dtypes.to_torch(CAST_TARGET[dtype]) if dtype else None
    for k, t in tensors.items():
        if tdt is not None and t.is_floating_point() and not k.endswith(".alpha") and t.ndim:
            tensors[k] = t.to(tdt)
        tensors[k] = tensors[k].contiguous()
    raise_all(check_output(path, [Path(p) for p in inputs], overwrite,
                           sum(t.numel() * t.element_size() for t in tensors.values())))
    meta = {"ss_network_module": "networks.lora", "convkit.lora_format": fmt,
            "convkit.arch": arch, **(metadata or {})}
    specs = [OutSpec(k, dtypes.from_torch(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(path, specs, meta) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return path
