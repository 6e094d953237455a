"""``--extras DIR --extras-format gguf``: text encoders / VAE as GGUF files, in the form each
loader takes unmodified (``formats/extras/gguf.toml``: per key-map kind and ``--layout``).

ComfyUI layout: the T5 encoder as a llama.cpp ``t5encoder`` GGUF (``formats/keymaps/t5_gguf.toml``)
for ComfyUI-GGUF's CLIP loaders; CLIP-L, OpenCLIP-G and the VAE stay safetensors (no ComfyUI
loader takes them as GGUF; the data says why). stable-diffusion.cpp layout: every component as
GGUF with the names its ``--t5xxl`` / ``--clip_l`` / ``--clip_g`` / ``--vae`` loaders convert.

A GGUF extra is one more output file of the quantize plan: same type decisions
(:class:`~convkit.quantize.rules.GGUFTyper`), same ops, engine and sink, its own error report,
atomic rename and reopen-and-verify.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnknownNameError, UsageError
from .. import data
from ..keymap._data import load_toml
from .rules import GGUF_PLAIN, ArchRules, GGUFTyper, TypeRule

EXTRAS_FORMATS = ("safetensors", "gguf")
AUTO = "auto"


@dataclass(frozen=True)
class ExtraRule:
    """What ``--extras-format gguf`` writes for one key-map kind under one layout."""

    kind: str
    layout: str
    format: str                      # "gguf" or "safetensors"
    loader: str = ""
    arch: str = ""
    names: str = ""
    default_type: str = "F16"
    type_rules: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()
    why: str = ""
    why_arch: str = ""
    same: tuple[tuple[str, ...], ...] = field(default=())

    def for_arch(self, arch: str) -> "ExtraRule":
        """This rule, or a safetensors one if the loader has no model for ``arch``."""
        if self.format == "gguf" and self.archs and arch not in self.archs:
            return ExtraRule(self.kind, self.layout, "safetensors", why=self.why_arch)
        return self


@functools.cache
def _data() -> dict:
    return data.load_toml("extras/gguf.toml")


def rule_for(kind: str, layout: str) -> ExtraRule:
    d = _data().get(kind, {})
    r = d.get(layout)
    same = tuple(tuple(g) for g in d.get("same", []))
    if r is None:
        return ExtraRule(kind, layout, "safetensors", same=same,
                         why=f"no GGUF form is known for a '{kind}' component under --layout "
                             f"{layout} (formats/extras/gguf.toml)")
    return ExtraRule(kind, layout, r["format"], r.get("loader", ""), r.get("arch", ""),
                     r.get("names", ""), r.get("default_type", "F16"),
                     tuple(r.get("type_rules", [])), tuple(r.get("keep", [])),
                     tuple(r.get("archs", [])), r.get("why", ""), r.get("why_arch", ""), same)


def parse_extras_format(fmt: str) -> str:
    f = (fmt or "safetensors").strip().lower()
    if f not in EXTRAS_FORMATS:
        raise UnknownNameError("--extras-format", fmt, EXTRAS_FORMATS)
    return f


def parse_extras_type(qtype: str | None) -> str | None:
    """``None``/``'auto'`` -> None (per-component default); else a plain GGUF type name."""
    if qtype is None or qtype.strip().lower() == AUTO:
        return None
    q = qtype.strip().upper()
    if q.startswith("GGUF:"):
        q = q[5:]
    if q not in GGUF_PLAIN:
        raise UnknownNameError("GGUF type for --extras-type", qtype, GGUF_PLAIN + (AUTO,))
    return q


# ------------------------------------------------------------------------------------ names


@functools.cache
def rename_table(name: str) -> tuple[tuple[re.Pattern, str], ...]:
    """``formats/keymaps/<name>.toml`` [names]: (compiled source pattern, output pattern)."""
    out = []
    for src, dst in load_toml(name)["names"].items():
        pat = re.escape(src).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
        out.append((re.compile(pat + r"\Z"), dst))
    return tuple(out)


def rename(table, key: str) -> str | None:
    for pat, dst in table:
        m = pat.match(key)
        if m:
            return dst.replace("{bid}", m.group("bid")) if "bid" in pat.groupindex else dst
    return None


def output_names(rule: ExtraRule, comp, rel_keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """{relative source name: output name} and the names left out (buffers, tied duplicates)."""
    present = set(rel_keys)
    dropped = [k for k in rel_keys if comp.is_buffer(k)]
    alias = {}
    for group in rule.same:
        have = [n for n in group if n in present]
        if have:
            alias[have[0]] = group[0]
            dropped += have[1:]
    table = rename_table(rule.names) if rule.names else None
    out, unknown = {}, []
    for k in rel_keys:
        if k in dropped:
            continue
        k2 = alias.get(k, k)
        name = rename(table, k2) if table is not None else k2
        if name is None:
            unknown.append(k)
        else:
            out[k] = name
    if unknown:
        raise UsageError(f"{comp.name} ({rule.kind}): no {rule.loader} GGUF name for "
                         f"{len(unknown)} tensors, e.g. '{unknown[0]}' (formats/keymaps/"
                         f"{rule.names}.toml); nothing was written",
                         hint="use --extras-format safetensors for this checkpoint")
    dup = len(set(out.values())) != len(out)
    if dup:
        raise UsageError(f"{comp.name} ({rule.kind}): two tensors map to the same GGUF name "
                         f"(formats/keymaps/{rule.names}.toml)")
    return out, dropped


# ------------------------------------------------------------------------------------ plans


def _arch_rules(rule: ExtraRule) -> ArchRules:
    # small_values=0: llama.cpp / sd.cpp quantize every 2-D weight whose rows fit the block
    # (ComfyUI-GGUF's 1024-value threshold is for image models); 1-D tensors stay F32.
    keep = {"keep": list(rule.keep), "rearrange": False}
    return ArchRules(f"extras {rule.kind}/{rule.layout}", (), 0, keep, keep, {}, {})


def _typer(rule: ExtraRule, qtype: str) -> GGUFTyper:
    return GGUFTyper(qtype, _arch_rules(rule), rule.layout,
                     [TypeRule.parse(r) for r in rule.type_rules])


def bundle_into(plan, src, det, blocks, floats) -> list[str]:
    """stable-diffusion.cpp layout for SD1/SDXL: add the text encoders and the VAE to the main
    file under their checkpoint names (what sd.cpp's own ``-M convert`` writes). sd.cpp tells
    SD1 / SD2 / SDXL apart by the text encoders found in the *model* file
    (``ModelLoader::get_sd_version``) and only then places --clip_l / --vae tensors, so a
    UNet-only GGUF plus separate text-encoder files cannot load. Each component gets its
    --extras-format gguf default type and keep rules (formats/extras/gguf.toml, ``sdcpp``);
    buffers (position_ids, logit_scale) are left out. Returns the bundled components."""
    from .gguf_plan import gguf_item

    bundled = []
    order = {k: n for n, k in enumerate(src.keys())}
    for comp_name, keys in det.component_keys.items():
        if comp_name == det.arch.diffusion_component or not keys:
            continue
        comp = det.arch.components[comp_name]
        rule = rule_for(comp.keymap, "sdcpp")
        typer = _typer(rule, rule.default_type)
        for k in keys:
            if comp.is_buffer(det.strip(k)):
                continue
            info = src.info(k)
            if not info.dtype.startswith(("F", "BF")):
                continue
            dec = typer.decide(k, info.shape, info.dtype)
            item = gguf_item(blocks, floats, k, k, info, dec, "")
            item.op.order(item, order[k])
            plan.items.append(item)
        bundled.append(comp_name)
    return bundled


def plan_gguf_extra(plan, src, det, comp_name: str, keys: list[str], out: Path,
                    rule: ExtraRule, qtype: str | None) -> None:
    """Add one extra component as its own GGUF file to ``plan`` (no data read)."""
    from ..engine import OutFile
    from ..provenance import output_metadata
    from .ops import GGUFBlocksOp, GGUFFloatOp
    from .report import REPORT_KEY, ErrorReport
    from .gguf_plan import gguf_item, gguf_kvs

    comp = det.arch.components[comp_name]
    qtype = qtype or rule.default_type
    rel = {k: det.strip(k) for k in keys}
    names, dropped = output_names(rule, comp, list(rel.values()))
    fid = f"extras:{comp_name}"
    report = ErrorReport(f"gguf:{qtype}")
    blocks, floats = GGUFBlocksOp(report, str(src.path)), GGUFFloatOp(report, str(src.path))
    typer = _typer(rule, qtype)
    items = []
    for n, k in enumerate(keys):
        r = rel[k]
        if r not in names:
            continue
        info = src.info(k)
        dec = typer.decide(names[r], info.shape, info.dtype)
        item = gguf_item(blocks, floats, k, names[r], info, dec, fid)
        item.op.order(item, n)
        items.append(item)
    plan.items += items
    step = {"op": "extract", "component": comp_name, "format": "gguf", "type": qtype,
            "layout": rule.layout}
    meta = output_metadata(src, step, storage={"convkit.quantization": f"gguf:{qtype}",
                                               "convkit.layout": rule.layout,
                                               "convkit.component": comp_name})
    plan.add_file(OutFile(fid, out, "gguf", meta, kvs=gguf_kvs(qtype, rule.arch or None),
                          reserve=REPORT_KEY, fill=report.summary_text))
    plan.reports[fid] = report
    plan.extras.append(fid)
    how = (f"{rule.names} names" if rule.names else "checkpoint names, prefix removed")
    arch = f", general.architecture {rule.arch}" if rule.arch else ""
    note = (f"extras: {comp_name} ({rule.kind}) -> {out.name}: GGUF {qtype} ({how}{arch}) for "
            f"{rule.loader}")
    if dropped:
        note += f"; left out: {', '.join(dropped)}"
    fallbacks = [i for i in items if i.wanted]
    if fallbacks:
        note += f"; {len(fallbacks)} tensors use a fallback type (rows do not fit)"
    plan.notes.append(note)
