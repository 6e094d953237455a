"""The verify report folder: ``report.json``, every render as PNG, ``contact_sheet.png`` (rows
= prompts, columns = reference then each artifact, scores under every tile) and a
self-contained ``report.html`` (images inline).

The folder is built next to its destination and moved into place when complete, so an
interrupted or failed run leaves no half-written report; an existing report folder is replaced,
any other non-empty folder is refused before anything renders.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputError, UsageError

TILE_MIN, TILE_MAX = 128, 256
PASS, FAIL = (30, 130, 60), (200, 40, 40)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "model"


class ReportWriter:
    def __init__(self, dest):
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError("the report folder is a file", path=self.dest)
        if self.dest.is_dir() and any(self.dest.iterdir()) and \
                not (self.dest / "report.json").is_file():
            raise UsageError("the report folder is not empty and holds no earlier report",
                             path=self.dest, hint="give a new or empty folder, or an earlier "
                                                  "report folder to replace")
        parent = self.dest.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp",
                                             dir=parent))
        except OSError as e:
            raise OutputError(f"cannot write the report there: {e.strerror}",
                              path=self.dest) from None

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, result) -> None:
        try:
            self._write(result)
            self._swap_in()
        except BaseException:
            self.discard()
            raise
        result.report_dir = self.dest
        result.contact_sheet = self.dest / "contact_sheet.png"

    # -- contents ----------------------------------------------------------------------------
    def _write(self, result) -> None:
        from PIL import Image

        img_dir = self.tmp / "images"
        img_dir.mkdir()
        columns = [("reference", result.reference.images, None)]
        columns += [(a.ref.name, a.run.images, a) for a in result.artifacts]
        paths: dict[tuple[int, int], str] = {}
        for c, (name, images, _) in enumerate(columns):
            d = img_dir / _slug(name)
            d.mkdir(exist_ok=True)
            for r, im in enumerate(images):
                p = d / f"{r:02d}-{_slug(im.prompt.name)}.png"
                Image.fromarray(im.pixels).save(p, "PNG")
                paths[(r, c)] = str(p.relative_to(self.tmp))
        doc = result.to_dict()
        doc["report_dir"] = str(self.dest)
        doc["contact_sheet"] = str(self.dest / "contact_sheet.png")
        doc["files"] = {"reference": [paths[(r, 0)] for r in range(len(result.prompts))]}
        for c, a in enumerate(doc["artifacts"], start=1):
            a["files"] = [paths[(r, c)] for r in range(len(result.prompts))]
        (self.tmp / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
        sheet = contact_sheet(result, columns)
        sheet.save(self.tmp / "contact_sheet.png", "PNG")
        (self.tmp / "report.html").write_text(_html(result, columns, doc), encoding="utf-8")

    def _swap_in(self) -> None:
        mode = 0o777 & ~_umask()
        os.chmod(self.tmp, mode)
        for p in self.tmp.rglob("*"):
            os.chmod(p, mode if p.is_dir() else mode & 0o666)
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def _tile(pixels: np.ndarray, size: int):
    from PIL import Image

    im = Image.fromarray(pixels)
    if im.width == size and im.height == size:
        return im
    scale = size / max(im.width, im.height)
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                     resample)


def contact_sheet(result, columns):
    """Rows = prompts, columns = reference then each artifact; scores under every tile."""
    from PIL import Image, ImageDraw, ImageFont

    first = result.reference.images[0].pixels
    tile = int(min(TILE_MAX, max(TILE_MIN, max(first.shape[:2]))))
    font = ImageFont.load_default()
    pad, label_w, head_h, text_h = 6, 120, 34, 30
    cell_w, cell_h = tile + pad, tile + text_h + pad
    rows = len(result.prompts)
    w = label_w + cell_w * len(columns) + pad
    h = head_h + cell_h * rows + pad
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, (name, _, art) in enumerate(columns):
        x = label_w + c * cell_w
        colour = (0, 0, 0) if art is None else (PASS if art.ok else FAIL)
        draw.text((x, 4), _fit(draw, name, font, tile), fill=colour, font=font)
        if art is not None:
            draw.text((x, 17), f"[{art.kind}]", fill=colour, font=font)
    for r, p in enumerate(result.prompts):
        y = head_h + r * cell_h
        draw.text((pad, y + tile // 2 - 12), p.name[:18], fill=(0, 0, 0), font=font)
        draw.text((pad, y + tile // 2 + 2), f"seed {p.seed}"[:18], fill=(90, 90, 90), font=font)
        for c, (_, images, art) in enumerate(columns):
            x = label_w + c * cell_w
            sheet.paste(_tile(images[r].pixels, tile), (x, y))
            if art is None:
                line1, colour = "reference", (0, 0, 0)
                line2 = f"{images[r].seconds:.1f} s" if not images[r].cached else "cached"
            else:
                s = art.scores[r]
                colour = PASS if s.ok else FAIL
                line1 = f"PSNR {_fmt_psnr(s.psnr)} SSIM {s.ssim:.4f}"
                line2 = "ok" if s.ok else ("FAIL: " + s.failures[0])[:40]
            draw.text((x, y + tile + 2), _fit(draw, line1, font, tile), fill=colour, font=font)
            draw.text((x, y + tile + 15), _fit(draw, line2, font, tile), fill=colour, font=font)
    return sheet


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels, so that columns do not overlap."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _data_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _html(result, columns, doc) -> str:
    e = html.escape
    rows = []
    ref = doc["reference"]["render"]
    rows.append(f"<tr><td>reference</td><td>{e(doc['reference']['path'])}</td><td>-</td>"
                f"<td>-</td><td>-</td><td>{ref['seconds_per_image'] or '-'}</td>"
                f"<td>{_mb(ref['peak_rss_bytes'])}</td><td>-</td></tr>")
    for a in doc["artifacts"]:
        m = a["mean"]
        cls = "ok" if a["ok"] else "fail"
        verdict = "pass" if a["ok"] else e(a["failures"][0])
        rows.append(f"<tr class='{cls}'><td>{e(a['name'])}</td><td>{e(a['artifact'])}</td>"
                    f"<td>{e(a['kind'])}</td><td>{m['psnr']}</td><td>{m['ssim']}</td>"
                    f"<td>{a['render']['seconds_per_image'] or '-'}</td>"
                    f"<td>{_mb(a['render']['peak_rss_bytes'])}</td><td>{verdict}</td></tr>")
    grid = ["<tr><th>prompt</th>" + "".join(f"<th>{e(n)}</th>" for n, _, _ in columns)
            + "</tr>"]
    for r, p in enumerate(result.prompts):
        cells = [f"<td class='p'><b>{e(p.name)}</b><br>seed {p.seed}<br>"
                 f"<small>{e(p.text)}</small></td>"]
        for _, images, art in columns:
            cap = "reference" if art is None else (
                f"PSNR {_fmt_psnr(art.scores[r].psnr)} dB<br>SSIM {art.scores[r].ssim:.4f}"
                + ("" if art.scores[r].ok else "<br>" + e("; ".join(art.scores[r].failures))))
            cls = "" if art is None else ("ok" if art.scores[r].ok else "fail")
            cells.append(f"<td class='{cls}'><img src='{_data_uri(images[r].pixels)}'>"
                         f"<br>{cap}</td>")
        grid.append("<tr>" + "".join(cells) + "</tr>")
    s = result.reference.settings
    verdict = "all artifacts pass" if doc["ok"] else "some artifacts FAIL"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>convkit verify report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 13px; }}
img {{ width: {max(TILE_MIN, min(TILE_MAX, s.width))}px; image-rendering: pixelated; }}
tr.ok td:first-child, td.ok {{ background: #eef8ee; }}
tr.fail td:first-child, td.fail {{ background: #fbeaea; }}
td.p {{ max-width: 16em; }}
</style></head><body>
<h1>convkit verify: {e(verdict)}</h1>
<p>Reference settings: {e(s.label())}. Artifact settings:
{e(result.artifacts[0].run.settings.label()) if result.artifacts else "-"}.
convkit {e(doc["convkit_version"])}.</p>
<table><tr><th>name</th><th>file</th><th>kind</th><th>mean PSNR (dB)</th><th>mean SSIM</th>
<th>s / image</th><th>peak memory</th><th>verdict</th></tr>
{"".join(rows)}</table>
<table>{"".join(grid)}</table>
</body></html>
"""
