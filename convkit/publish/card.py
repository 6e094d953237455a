"""The model card (``README.md``) of a release: the Hub's YAML metadata (base model and its
relation, library, pipeline tag, tags, licence) and a body that says what each file is, which
tool loads it from which folder, how it was verified and where it came from."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .. import __version__, data
from ..errors import UsageError
from .collect import Release

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class CardError(UsageError):
    """The card's metadata would not be valid on the Hub (exit 2)."""


def check_repo_id(repo: str, what: str = "--repo") -> str:
    """The Hub's repo id rules (huggingface_hub utils/_validators.py validate_repo_id: one
    namespace, [A-Za-z0-9_.-], no '--' or '..', not ending in .git, at most 96 characters)."""
    if (not REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git")
            or len(repo) > 96):
        raise CardError(f"{what} '{repo}' is not a valid Hub repo id",
                        hint="OWNER/NAME of letters, digits, '-', '_' and '.'")
    return repo


@dataclass
class Licence:
    license: str
    name: str | None = None
    link: str | None = None
    source: str = ""                # where it came from (a base, --license)


def hub_data() -> dict:
    return data.load_toml("publish/hub.toml")


def choose_licence(release: Release, given: str | None, name: str | None,
                   link: str | None) -> Licence:
    """--license, else the licence every known base agrees on (the recipe's inputs, or a released
    base convkit knows); a base whose licence is unknown, or bases that disagree, need --license."""
    hub = hub_data()
    if given:
        if given not in hub["licenses"]:
            close = difflib.get_close_matches(given, hub["licenses"], n=1, cutoff=0.5)
            raise CardError(f"--license '{given}' is not a Hub licence id",
                            hint=(f"did you mean '{close[0]}'? " if close else "")
                            + "or --license other --license-name NAME --license-link URL")
        if given == "other" and not (name and link):
            raise CardError("--license other needs --license-name and --license-link")
        if given != "other" and (name or link):
            raise CardError("--license-name/--license-link go with --license other only")
        return Licence(given, name, link, "--license")
    found: dict[tuple, list[str]] = {}
    unknown = []
    for n, i in release.record.get("inputs", {}).items():
        lic = None
        if i.get("license"):
            lic = (i["license"], None, None)
        elif i.get("hub") and i["hub"] in hub["bases"]:
            b = hub["bases"][i["hub"]]
            lic = (b["license"], b.get("license_name"), b.get("license_link"))
        if lic:
            found.setdefault(lic, []).append(i.get("hub") or n)
        elif not i.get("name", "").startswith(("demo:", "tiny:")):
            unknown.append(i.get("hub") or i.get("name") or n)
    if len(found) == 1 and not unknown:
        (lic, who), = found.items()
        return Licence(*lic, source="from " + ", ".join(who))
    if len(found) > 1:
        raise CardError("the bases' licences differ: " + "; ".join(
            f"{', '.join(w)}: {lic[1] or lic[0]}" for lic, w in found.items()),
            hint="give the release's licence with --license")
    raise CardError("the licence of the base is not known"
                    + (f" ({', '.join(unknown)})" if unknown else ""),
                    hint="give it with --license (a Hub licence id such as openrail++, or other "
                         "with --license-name and --license-link)")


def base_models(release: Release, given: tuple[str, ...]) -> list[str]:
    out = [check_repo_id(b, "--base-model") for b in given]
    for i in release.record.get("inputs", {}).values():
        if i.get("hub"):
            out.append(check_repo_id(i["hub"], "a recipe input's hub"))
    return list(dict.fromkeys(out))


def relation(release: Release, given: str | None) -> str | None:
    rels = hub_data()["relations"]
    r = given or release.record.get("recipe", {}).get("publish", {}).get("base_model_relation")
    if r is None and release.ops:
        ops = release.ops
        r = ("merge" if "merge-lora" in ops or "assemble" in ops else
             "adapter" if {"extract-lora", "convert-lora"} & ops else
             "quantized" if "quantize" in ops else None)
    elif r is None:         # plain files: what they are says it
        kinds = {e.kind for e in release.weights}
        r = ("adapter" if kinds == {"lora"} else
             "quantized" if any(k.startswith("gguf") or "nf4" in k or "fp8" in e.format
                                for e in release.weights for k in [e.kind]) else None)
    if r is not None and r not in rels:
        raise CardError(f"base_model_relation '{r}' is not one of {', '.join(rels)}")
    return r


def library(release: Release) -> str:
    kinds = {e.kind for e in release.weights}
    if "diffusers" in kinds:
        return "diffusers"
    if kinds and all(k.startswith("gguf") for k in kinds):
        return "gguf"
    return "diffusion-single-file"


def tags(release: Release) -> list[str]:
    cards = data.load_toml("publish/card.toml")["architectures"]
    out = []
    for a in sorted(release.architectures):
        out += cards.get(a, {}).get("tags", [a])
    kinds = {e.kind for e in release.weights}
    out.append("text-to-image")
    if any(k.startswith("gguf") for k in kinds):
        out.append("gguf")
    if "lora" in kinds:
        out.append("lora")
    if any("nf4" in k for k in kinds):
        out.append("nf4")
    if any("fp8" in e.format for e in release.weights):
        out.append("fp8")
    if any("ComfyUI" in e.loader for e in release.weights):
        out.append("comfyui")
    out.append("convkit")
    return list(dict.fromkeys(out))


def metadata(release: Release, lic: Licence, bases: list[str], rel: str | None) -> dict:
    meta: dict = {}
    if bases:
        meta["base_model"] = bases if len(bases) > 1 or rel == "merge" else bases[0]
        if rel:
            meta["base_model_relation"] = rel
    meta["library_name"] = library(release)
    meta["pipeline_tag"] = "text-to-image"
    meta["license"] = lic.license
    if lic.name:
        meta["license_name"] = lic.name
        meta["license_link"] = lic.link
    meta["tags"] = tags(release)
    return meta


def render(release: Release, meta: dict, title: str) -> str:
    import yaml     # PyYAML: a huggingface_hub dependency

    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{head}\n---\n\n" + body(release, meta, title)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _gate(g: dict | None) -> str:
    if not g:
        return ""
    ps = g.get("psnr")
    # verify reports identical images as PSNR inf (capped at 100 dB in its summaries)
    ps = "identical images" if ps == "inf" or (isinstance(ps, float) and ps >= 100) else \
        (f"PSNR {ps:.1f} dB" if isinstance(ps, float) else "")
    ss = f"SSIM {g['ssim']:.3f}" if isinstance(g.get("ssim"), float) else ""
    return f"{'pass' if g.get('ok') else 'FAIL'} ({g.get('kind')}: " + \
        ", ".join(x for x in (ps, ss) if x) + ")"


def body(release: Release, meta: dict, title: str) -> str:
    rec = release.record
    r = rec.get("recipe", {})
    pub = r.get("publish", {})
    archs = data.load_toml("publish/card.toml")["architectures"]
    arch_titles = [archs.get(a, {}).get("title", a) for a in sorted(release.architectures)]
    lines = [f"# {title}", ""]
    if r.get("description"):
        lines += [r["description"], ""]
    if arch_titles:
        lines += [f"Architecture: {', '.join(arch_titles)}.", ""]
    lines += ["## Files", "",
              "| File | What | Format | Size | Loads in | Verified |",
              "| --- | --- | --- | ---: | --- | --- |"]
    for e in release.weights:
        lines.append(f"| `{e.path}` | {e.about or ''} | {e.format} | {_size(e.bytes)} | "
                     f"{e.loader} | {_gate(e.gate)} |")
    lines.append("")
    use = _usage(release, pub)
    if use:
        lines += ["## Recommended settings", "", *use, ""]
    lines += _verification(release)
    lines += ["## Checksums (sha256)", "", "| File | sha256 |", "| --- | --- |"]
    for e in release.files:
        lines.append(f"| `{e.path}` | `{e.sha256}` |")
    lines += ["", "## Provenance", ""]
    for n, i in rec.get("inputs", {}).items():
        src = f"[{i['hub']}](https://huggingface.co/{i['hub']})" if i.get("hub") else \
            f"`{i.get('name', n)}`"
        lines.append(f"- input `{n}`: {src}" + (f" — {i['about']}" if i.get("about") else ""))
    if r.get("name"):
        over = r.get("overrides") or []
        lines.append(f"- recipe: `{r['name']}`" + (" ([recipe.toml](recipe.toml))"
                                                    if r.get("file") else "")
                     + (f", with --set {', '.join(over)}" if over else ""))
    for name, a in rec.get("artifacts", {}).items():
        info = rec.get("artifact_info", {}).get(name, {})
        if a.get("op") != "verify" and info.get("publish", True):
            lines.append(f"- `{a['path']}`: convkit {a['op']} of "
                         f"{', '.join(info.get('reads', [])) or 'its inputs'} "
                         f"(content key `{a['key'][:16]}`)")
    lines.append(f"- made with convkit {rec.get('convkit', __version__)}")
    return "\n".join(lines) + "\n"


def _usage(release: Release, pub: dict) -> list[str]:
    s = {}
    for a in release.record.get("artifacts", {}).values():
        if a.get("op") == "verify" and a.get("summary", {}).get("settings"):
            s = a["summary"]["settings"]
            break
    out = []
    sampler = pub.get("sampler") or s.get("sampler")
    if sampler:
        out.append(f"- sampler: {sampler}" + (f", scheduler {pub['scheduler']}"
                                              if pub.get("scheduler") else ""))
    steps = pub.get("steps", s.get("steps"))
    if steps is not None:
        out.append(f"- steps: {steps}")
    g = pub.get("guidance", s.get("guidance"))
    if g is not None:
        out.append(f"- guidance (CFG): {g:g}")
    return out


def _verification(release: Release) -> list[str]:
    rows = []
    for name, a in release.record.get("artifacts", {}).items():
        if a.get("op") != "verify":
            continue
        s = a.get("summary", {})
        st, rs = s.get("settings", {}), s.get("reference_settings", {})
        label = (lambda d: f"{d.get('sampler')}, {d.get('steps')} steps, guidance "
                 f"{d.get('guidance')}, {d.get('width')}x{d.get('height')}")
        rows.append(f"- `{name}`: {'passed' if s.get('ok') else 'FAILED'}; artifacts at "
                    f"{label(st)}, reference at {label(rs)}")
    if not rows:
        return []
    out = ["## Verification", "",
           "Every file was rendered by `convkit verify` with the same prompts and seeds as its "
           "reference and gated on PSNR/SSIM against thresholds for its kind "
           "(convkit formats/verify/gates.toml).", "", *rows, ""]
    for img in release.images:
        out += [f"![{img.artifact} contact sheet]({img.path})", ""]
    return out
