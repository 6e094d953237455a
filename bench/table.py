"""Benchmark: the whole speed table of issue 8 in one run, plus two external baselines.

Input: the 13.9 GB full-size SDXL fp32 checkpoint (``_common.full_size_checkpoint``: real
single-file key names and shapes, random values), or ``--input PATH`` / ``--tiny`` for a quick
end-to-end check. Outputs (and the I/O floors' outputs) go to ``--workdir`` (bench/data) and are
deleted after every run.

Rows (each in its own process: wall time including process start and imports, peak RSS = that
process's VmHWM):

  1      convert IN --dtype fp16                          convkit.convert.convert
  2      merge-lora, rank-64 kohya LoRA over every UNet module (bench/lora.py's), fp16 out
  3-7    quantize fp8-e4m3fn, fp8-scaled, gguf:Q8_0, nf4, gguf:Q4_K_S   (verification on)
  8a-8c  convert --dtype fp16 FROM the Q8_0 GGUF (row 5's output), the nf4 file (row 6) and the
         fp8-scaled file (row 4)
  9      quantize --to gguf:F16 (UNet only) vs ComfyUI-GGUF's tools/convert.py, same input (warm)
  10     quantize --to gguf:Q8_0 --layout sdcpp (whole checkpoint) vs stable-diffusion.cpp's
         ``sd-cli -M convert --type q8_0`` of the same file (warm)

Every ratio is against an I/O floor measured in the same run, right next to the row's runs:
read the row's whole input file and write (fsync'd, like convkit's output) as many bytes as that
row's output (bench/_common.IO_FLOOR; the merge floor reads the base, not the LoRA; the GGUF
rows' floors read all 13.9 GB although convkit reads only the UNet's 10.3 GB). A run's output is
deleted as soon as it is measured, so it never sits in the page cache during the next run (rows
4-6 keep their last output, evicted from the cache, as the inputs of rows 8a-8c). Regimes:
``warm`` reads the input(s) once before every run, ``cold`` evicts them from the page cache
before every run (posix_fadvise DONTNEED). Per row and regime: best and median of ``--repeat``
runs of the tool and of its floor; "best x" = best/best floor, "median x" = median/median
floor; peak RSS = the largest of the runs. convkit rows above ``--rss-limit-mb`` (1500) print a
warning. Rows 9 and 10 run warm only; the external tool's time includes an fsync of its output
(convkit fsyncs its own). ComfyUI-GGUF's convert.py runs in the measured process through runpy
(exact VmHWM); sd-cli (``-t <nproc>``, ``--sdcpp-threads``) is a child of a small Python
launcher, its RSS is the child's ru_maxrss (which includes the launcher's ~12 MB).

    python bench/table.py --tiny --repeat 1 --regime warm             # ~1 min, checks every row
    python bench/table.py --repeat 3 --regime both --markdown \\
        --sdcpp /work/ext/stable-diffusion.cpp/build/bin/sd-cli \\
        --comfyui-gguf /work/ext/ComfyUI-GGUF/tools/convert.py
    python bench/table.py --rows 1,5,8a --regime warm                 # a subset

Results: printed, and written as JSON to bench/data/table-<date>.json (``--json PATH``).
Check ``uptime`` first: the ratios mean something only on a quiet machine.

External tools (public repositories; their code is not part of convkit and is not committed).
Snapshots used in the first run (2026-12-06):

  ComfyUI-GGUF       github.com/city96/ComfyUI-GGUF        795e45156ece99afbc3efef911e63fcb46e6a20d
  stable-diffusion.cpp github.com/leejet/stable-diffusion.cpp 97d2990807fe6d558e395f8764198d7c7e7b411c
  ggml (the submodule commit sd.cpp pins; .gitmodules names github.com/leejet/ggml, the commit
       is also in github.com/ggml-org/ggml, which is where it was taken from)
                                                           8e800cef2948046cc47f9db6090491c6128ca42c

    mkdir -p /work/ext && cd /work/ext
    git clone https://github.com/city96/ComfyUI-GGUF && git -C ComfyUI-GGUF checkout 795e4515
    git clone https://github.com/leejet/stable-diffusion.cpp && cd stable-diffusion.cpp
    git checkout 97d29908
    git clone https://github.com/ggml-org/ggml ggml && git -C ggml checkout 8e800cef
    #   (== git submodule update --init ggml; libwebp/libwebm/the server frontend are not needed)
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DSD_BUILD_SHARED_LIBS=OFF \\
          -DSD_WEBP=OFF -DSD_WEBM=OFF -DSD_SERVER_BUILD_FRONTEND=OFF
    cmake --build build --config Release -j2 --target sd-cli     # -> build/bin/sd-cli
    # CPU only (no SD_CUDA etc.); GGML_NATIVE is on by default (-march=native)

  In the snapshot we had, the large tokenizer-data headers src/tokenizers/vocab/{t5,umt5,
  gemma_*,gemma2_*,mistral_*,gpt_oss_*,qwen_merges}.hpp were missing; they were replaced by
  one-byte stubs (``static const unsigned char <name>[] = {0x00};``). They only feed the T5 /
  LLM tokenizers, which ``-M convert`` never touches (clip_merges.hpp was present). A full clone
  has them and needs no stubs.
  ComfyUI-GGUF's convert.py runs with this venv's python (gguf, torch, safetensors installed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common
from _common import (
    IO_FLOOR,
    WARM,
    bench_source,
    drop,
    evict,
    fmt,
    human,
    loadavg,
    remove,
    run_measured,
    size_of,
    summarise_runs,
)

# -- measured code (each runs in a fresh process through _common.run_measured) -----------------
# Only the public functions are called: convert.convert, quantize.quantize, lora.merge_lora.

_PRELUDE = """
import sys, json
try:   # what the convkit command does before importing torch
    from convkit.runtime import prefer_io_friendly_threads
    prefer_io_friendly_threads()
except ImportError:
    pass
"""

CONVERT = _PRELUDE + """
from convkit.convert import convert
convert(sys.argv[1], sys.argv[2], 'fp16', overwrite=True)
"""

QUANTIZE = _PRELUDE + """
from convkit.quantize import quantize
kw = {'layout': sys.argv[4]} if len(sys.argv) > 4 and sys.argv[4] else {}
r = quantize(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True, **kw)   # verify=True (default)
try:
    info = {'quantize_s': r.stats.seconds, 'verify_s': r.stats.verify_seconds}
    open(sys.argv[2] + '.info.json', 'w').write(json.dumps(info))
except Exception:
    pass
"""

MERGE = _PRELUDE + """
from convkit.lora import merge_lora
merge_lora(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype='fp16', overwrite=True)
"""

# ComfyUI-GGUF's tools/convert.py, run as `python convert.py --src IN --dst OUT` in this process
COMFY = """
import os, runpy, sys
script, src, dst = sys.argv[1:4]
sys.argv = [script, '--src', src, '--dst', dst]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name='__main__')
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

# stable-diffusion.cpp's converter as a child; its peak RSS is the child's ru_maxrss
SDCPP = """
import json, os, resource, subprocess, sys
sd, src, dst, typ, threads = sys.argv[1:6]
p = subprocess.run([sd, '-M', 'convert', '-m', src, '-o', dst, '--type', typ, '-t', threads],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
if p.returncode != 0 or not os.path.exists(dst):
    sys.stderr.write(p.stdout[-6000:])
    sys.exit(p.returncode or 1)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(dst + '.info.json', 'w').write(json.dumps({'child_maxrss_mb': ru.ru_maxrss / 1024,
                                                'child_cpu_s': ru.ru_utime + ru.ru_stime}))
"""


class Row:
    def __init__(self, rid: str, label: str, code: str, args, ext: str, *, inputs=None,
                 needs: str | None = None, keep_as: str | None = None, other=None):
        self.rid, self.label, self.code, self.args, self.ext = rid, label, code, args, ext
        self.inputs = inputs          # callable -> list[Path] to warm/evict; [0] is the floor's
        self.needs = needs            # key of a kept output this row reads
        self.keep_as = keep_as        # keep this row's last output under this key
        self.other = other            # (name, code, args-fn, tool path) for rows 9/10



def _git_head(path: Path | None) -> str | None:
    if path is None:
        return None
    d = path if path.is_dir() else path.parent
    try:
        return subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None



def make_lora_for(base: Path, workdir: Path) -> Path:
    """bench/lora.py's rank-64 kohya LoRA over every UNet module (kept between runs)."""
    import lora as lora_bench

    default = base.resolve() == (lora_bench.DATA / "sdxl_full_f32.safetensors").resolve()
    if not default:    # another base (e.g. --tiny): its own LoRA, next to our other files
        lora_bench.DATA = workdir / f"table-lora-{base.stem}"
        lora_bench.DATA.mkdir(parents=True, exist_ok=True)
    return lora_bench.make_lora(base)


def _prepare(kept: dict, key: str, src: Path, workdir: Path) -> Path:
    """The input of rows 8a-8c: row 4/5/6's output, or made here (unmeasured) if not kept."""
    if key in kept and kept[key].exists():
        return kept[key]
    target = {"fp8-scaled": ("fp8-scaled", "safetensors"), "gguf:Q8_0": ("gguf:Q8_0", "gguf"),
              "nf4": ("nf4", "safetensors")}[key]
    out = workdir / f"table_keep_{key.replace(':', '_')}.{target[1]}"
    print(f"  making {out.name} for row 8 ...", file=sys.stderr)
    r = run_measured(QUANTIZE, str(src), str(out), target[0])
    drop(Path(str(out) + ".info.json"))
    if "error" in r:
        for line in r.get("stderr_tail", [])[-25:]:
            print(f"      {line}", file=sys.stderr)
        raise RuntimeError(f"could not make its input ({key}): {' '.join(r['error'])}")
    kept[key] = out
    return out


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure_row(row: Row, src: Path, regime: str, repeat: int, workdir: Path, kept: dict,
                rss_limit: float) -> dict:
    out = workdir / f"table_out.{row.ext}"
    floor_out = workdir / "table_floor.bin"
    inputs = row.inputs()
    floor_in = inputs[0]
    tool_runs: list[dict] = []
    floor_runs: list[dict] = []
    other_runs: list[dict] = []
    out_bytes = None
    other_bytes = None

    def prepare_cache():
        for p in inputs:
            if regime == "cold":
                evict(p)
            else:
                run_measured(WARM, str(p))

    def run_tool():
        nonlocal out_bytes
        remove(out)
        prepare_cache()
        r = run_measured(row.code, *row.args(out))
        info = Path(str(out) + ".info.json")
        if info.exists():
            r["info"] = json.loads(info.read_text())
            drop(info)
        if "error" not in r:
            r["out_bytes"] = size_of(out)
            out_bytes = r["out_bytes"]
            if row.keep_as is not None:    # the input of a row 8: keep the latest output
                keep = workdir / f"table_keep_{row.keep_as.replace(':', '_')}.{row.ext}"
                remove(keep)
                out.rename(keep)
                evict(keep)                # rows 8 warm it (or not) themselves
                kept[row.keep_as] = keep
        remove(out)       # not on disk (nor in the page cache) during the next runs
        tool_runs.append(r)
        _log(row, regime, "convkit", r)
        return r

    def run_floor():
        drop(floor_out)
        prepare_cache()
        r = run_measured(IO_FLOOR, str(floor_in), str(floor_out), str(out_bytes))
        drop(floor_out)
        floor_runs.append(r)
        _log(row, regime, "io-floor", r)

    def run_other():
        nonlocal other_bytes
        name, code, args_fn, _ = row.other
        o = workdir / f"table_other.{row.ext}"
        remove(o)
        prepare_cache()
        r = run_measured(code, *args_fn(o))
        info = Path(str(o) + ".info.json")
        if info.exists():
            r["info"] = json.loads(info.read_text())
            drop(info)
            if "child_maxrss_mb" in r["info"]:
                r["launcher_rss_mb"] = r["peak_rss_mb"]
                r["peak_rss_mb"] = r["info"]["child_maxrss_mb"]
        if "error" not in r:
            r["out_bytes"] = size_of(o)
            other_bytes = r["out_bytes"]
        remove(o)
        other_runs.append(r)
        _log(row, regime, name, r)

    load_before = loadavg()
    for rep in range(repeat):
        # the floor needs the output size: the tool goes first in rep 0, then the order alternates
        steps = [run_tool, run_floor] if rep % 2 == 0 else [run_floor, run_tool]
        if row.other is not None:
            steps.append(run_other) if rep % 2 == 0 else steps.insert(0, run_other)
        for step in steps:
            if step is run_floor and out_bytes is None:
                continue           # the tool failed: nothing to compare with
            step()
    remove(out)

    res = {"row": row.rid, "label": row.label, "regime": regime, "input": str(floor_in),
           "input_bytes": floor_in.stat().st_size, "load_before": load_before,
           "load_after": loadavg()}
    res.update(summarise_runs("convkit", tool_runs))
    res.update(summarise_runs("floor", floor_runs))
    if row.other is not None:
        res["other_name"] = row.other[0]
        res.update(summarise_runs("other", other_runs))
    if "convkit_best_s" in res and "floor_best_s" in res:
        res["best_x"] = res["convkit_best_s"] / res["floor_best_s"]
        res["median_x"] = res["convkit_median_s"] / res["floor_median_s"]
    if "other_best_s" in res and "floor_best_s" in res:
        res["other_best_x"] = res["other_best_s"] / res["floor_best_s"]
        res["other_median_x"] = res["other_median_s"] / res["floor_median_s"]
    if res.get("convkit_peak_rss_mb", 0) > rss_limit:
        res["rss_warning"] = True
        print(f"WARNING: row {row.rid} ({row.label}, {regime}): peak RSS "
              f"{res['convkit_peak_rss_mb']:.0f} MB > {rss_limit:.0f} MB", file=sys.stderr)
    res["runs"] = {"convkit": tool_runs, "floor": floor_runs}
    if row.other is not None:
        res["runs"]["other"] = other_runs
    return res



def _log(row: Row, regime: str, what: str, r: dict) -> None:
    if "error" in r:
        print(f"  [{row.rid} {regime}] {what}: FAILED {r['error']}", file=sys.stderr)
        for line in r.get("stderr_tail", [])[-25:]:
            print(f"      {line}", file=sys.stderr)
        return
    extra = f", out {human(r['out_bytes'])}" if "out_bytes" in r else ""
    print(f"  [{row.rid} {regime}] {what}: {r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB{extra}",
          file=sys.stderr)


def build_rows(src: Path, workdir: Path, kept: dict, args) -> list[Row]:
    s = str(src)
    lora_path: list[Path] = []

    def lora():
        if not lora_path:
            lora_path.append(make_lora_for(src, workdir))
        return lora_path[0]

    def q(target, layout=""):
        return lambda out: (s, str(out), target, layout)

    def from_kept(key):
        return lambda: [_prepare(kept, key, src, workdir)]

    def conv_from(key):
        return lambda out: (str(_prepare(kept, key, src, workdir)), str(out))

    rows = [
        Row("1", "convert --dtype fp16", CONVERT, lambda out: (s, str(out)), "safetensors"),
        Row("2", "merge-lora r64 kohya (all UNet modules), fp16", MERGE,
            lambda out: (s, str(lora()), str(out)), "safetensors", inputs=lambda: [src, lora()]),
        Row("3", "quantize fp8-e4m3fn", QUANTIZE, q("fp8-e4m3fn"), "safetensors"),
        Row("4", "quantize fp8-scaled", QUANTIZE, q("fp8-scaled"), "safetensors",
            keep_as="fp8-scaled"),
        Row("5", "quantize gguf:Q8_0", QUANTIZE, q("gguf:Q8_0"), "gguf", keep_as="gguf:Q8_0"),
        Row("6", "quantize nf4", QUANTIZE, q("nf4"), "safetensors", keep_as="nf4"),
        Row("7", "quantize gguf:Q4_K_S", QUANTIZE, q("gguf:Q4_K_S"), "gguf"),
        Row("8a", "convert Q8_0 GGUF -> fp16", CONVERT, conv_from("gguf:Q8_0"), "safetensors",
            inputs=from_kept("gguf:Q8_0"), needs="gguf:Q8_0"),
        Row("8b", "convert nf4 -> fp16", CONVERT, conv_from("nf4"), "safetensors",
            inputs=from_kept("nf4"), needs="nf4"),
        Row("8c", "convert fp8-scaled -> fp16", CONVERT, conv_from("fp8-scaled"), "safetensors",
            inputs=from_kept("fp8-scaled"), needs="fp8-scaled"),
    ]
    comfy = Path(args.comfyui_gguf) if args.comfyui_gguf else None
    sdcpp = Path(args.sdcpp) if args.sdcpp else None
    rows.append(Row("9", "quantize gguf:F16 (UNet) vs ComfyUI-GGUF convert.py", QUANTIZE,
                    q("gguf:F16"), "gguf",
                    other=("ComfyUI-GGUF convert.py", COMFY,
                           lambda o: (str(comfy), s, str(o)), comfy)))
    rows.append(Row("10", "quantize gguf:Q8_0 --layout sdcpp vs sd.cpp -M convert q8_0", QUANTIZE,
                    q("gguf:Q8_0", "sdcpp"), "gguf",
                    other=("sd.cpp -M convert", SDCPP,
                           lambda o: (str(sdcpp), s, str(o), "q8_0", str(args.sdcpp_threads)),
                           sdcpp)))
    for r in rows:
        if r.inputs is None:
            r.inputs = lambda: [src]
    return rows


# -- output -----------------------------------------------------------------------------------


def markdown(results: list[dict], meta: dict) -> str:
    out = [(f"Input: `{meta['input']}` ({human(meta['input_bytes'])}); {meta['date']}, "
            f"{meta['nproc']} CPUs, load before {' '.join(meta['load_before'])}, after "
            f"{' '.join(meta['load_after'])}; --repeat {meta['repeat']}."), "",
           ("| # | row | regime | floor best s | best s | best × floor | floor median s | "
            "median s | median × floor | peak RSS | out |"),
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.get("other_name"):
            continue
        if "convkit_best_s" not in r:
            out.append(f"| {r['row']} | {r['label']} | {r['regime']} | failed: "
                       f"{' '.join(r.get('convkit_error') or r.get('skipped') or ['?'])} "
                       "| | | | | | | |")
            continue
        warn = " ⚠" if r.get("rss_warning") else ""
        out.append(
            f"| {r['row']} | {r['label']} | {r['regime']} | {fmt(r.get('floor_best_s'))} | "
            f"{r['convkit_best_s']:.2f} | {fmt(r.get('best_x'))} | "
            f"{fmt(r.get('floor_median_s'))} | {r['convkit_median_s']:.2f} | "
            f"{fmt(r.get('median_x'))} | {r['convkit_peak_rss_mb']:,.0f} MB{warn} | "
            f"{human(r.get('convkit_out_bytes', 0))} |")
    cmp_rows = [r for r in results if r.get("other_name")]
    if cmp_rows:
        out += ["", ("| # | convkit | external tool | regime | floor best s | convkit best s | "
                     "convkit × floor | convkit RSS | convkit out | tool best s | tool × floor | "
                     "tool RSS | tool out | tool / convkit |"),
                "| --- | --- | --- | --- |" + " ---: |" * 10]
        for r in cmp_rows:
            if "skipped" in r:
                out.append(f"| {r['row']} | {r['label']} | {r['other_name']} | {r['regime']} | "
                           f"skipped: {r['skipped']} | | | | | | | | | |")
                continue
            ck = "convkit_best_s" in r
            ot = "other_best_s" in r
            out.append(
                f"| {r['row']} | {r['label'].split(' vs ')[0]} | {r['other_name']} | "
                f"{r['regime']} | {fmt(r.get('floor_best_s'))} | "
                + (f"{r['convkit_best_s']:.2f} | {fmt(r.get('best_x'))} | "
                   f"{r['convkit_peak_rss_mb']:,.0f} MB | {human(r['convkit_out_bytes'])} | "
                   if ck else f"failed: {' '.join(r.get('convkit_error', ['?']))} | | | | ")
                + (f"{r['other_best_s']:.2f} | {fmt(r.get('other_best_x'))} | "
                   f"{r['other_peak_rss_mb']:,.0f} MB | {human(r['other_out_bytes'])} | "
                   if ot else f"failed: {' '.join(r.get('other_error', ['?']))} | | | | ")
                + (f"{r['other_best_s'] / r['convkit_best_s']:.2f} |" if ck and ot else "— |"))
    return "\n".join(out)


def plain(results: list[dict]) -> str:
    out = [(f"{'#':<4} {'row':<58} {'regime':<6} {'floor s':>8} {'best s':>8} {'x':>6} "
            f"{'med s':>8} {'x':>6} {'RSS MB':>8}")]
    for r in results:
        name = r["label"][:58]
        if "skipped" in r:
            out.append(f"{r['row']:<4} {name:<58} {r['regime']:<6} skipped: {r['skipped']}")
            continue
        if "convkit_best_s" not in r:
            out.append(f"{r['row']:<4} {name:<58} {r['regime']:<6} FAILED: {r.get('convkit_error')}")
        else:
            out.append(f"{r['row']:<4} {name:<58} {r['regime']:<6} {fmt(r.get('floor_best_s')):>8} "
                       f"{r['convkit_best_s']:>8.2f} {fmt(r.get('best_x')):>6} "
                       f"{r['convkit_median_s']:>8.2f} {fmt(r.get('median_x')):>6} "
                       f"{r['convkit_peak_rss_mb']:>8.0f}" + ("  > RSS LIMIT" if r.get("rss_warning") else ""))
        if r.get("other_name"):
            if "other_best_s" in r:
                out.append(f"{'':<4} {'  ' + r['other_name']:<58} {r['regime']:<6} {'':>8} "
                           f"{r['other_best_s']:>8.2f} {fmt(r.get('other_best_x')):>6} "
                           f"{r['other_median_s']:>8.2f} {fmt(r.get('other_median_x')):>6} "
                           f"{r['other_peak_rss_mb']:>8.0f}")
            else:
                out.append(f"{'':<4} {'  ' + r['other_name']:<58} FAILED: {r.get('other_error')}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--regime", choices=["cold", "warm", "both"], default="both",
                    help="rows 1-8 (rows 9 and 10 always run warm)")
    ap.add_argument("--rows", default="all", help="comma list of row ids, e.g. 1,5,8a,9")
    ap.add_argument("--input", help="checkpoint to use instead of the full-size SDXL fp32 one "
                                    "(must be a real-layout SDXL single file)")
    ap.add_argument("--tiny", action="store_true",
                    help="use convkit's tiny SDXL (real layout) instead: an end-to-end check")
    ap.add_argument("--workdir", default=None, help="outputs (default bench/data)")
    ap.add_argument("--sdcpp", help="stable-diffusion.cpp's sd-cli binary (row 10)")
    ap.add_argument("--sdcpp-threads", type=int, default=os.cpu_count())
    ap.add_argument("--comfyui-gguf", help="ComfyUI-GGUF's tools/convert.py (row 9)")
    ap.add_argument("--rss-limit-mb", type=float, default=1500.0)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--json", help="result file (default bench/data/table-<date>[-input].json)")
    args = ap.parse_args()

    workdir = Path(args.workdir) if args.workdir else _common.DATA
    workdir.mkdir(parents=True, exist_ok=True)
    src = bench_source(args, workdir)
    default_input = not (args.tiny or args.input)

    kept: dict[str, Path] = {}
    rows = build_rows(src, workdir, kept, args)
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    if wanted is not None:
        unknown = wanted - {r.rid for r in rows}
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}; rows are {[r.rid for r in rows]}")
        rows = [r for r in rows if r.rid in wanted]
    regimes = ["cold", "warm"] if args.regime == "both" else [args.regime]
    meta = {"bench": "table", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "input": str(src), "input_bytes": src.stat().st_size, "repeat": args.repeat,
            "regimes": regimes, "nproc": os.cpu_count(), "load_before": loadavg(),
            "python": sys.version.split()[0], "convkit_git": _git_head(Path(__file__).parent),
            "sdcpp": args.sdcpp, "sdcpp_threads": args.sdcpp_threads,
            "sdcpp_git": _git_head(Path(args.sdcpp).resolve().parents[2]) if args.sdcpp else None,
            "sdcpp_ggml_git": _git_head(Path(args.sdcpp).resolve().parents[2] / "ggml")
            if args.sdcpp else None,
            "comfyui_gguf": args.comfyui_gguf, "comfyui_gguf_git": _git_head(
                Path(args.comfyui_gguf)) if args.comfyui_gguf else None}
    import convkit
    meta["convkit_version"] = getattr(convkit, "__version__", None)
    dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain",
                            "--", ":/convkit", ":/formats"], capture_output=True, text=True,
                           check=False).stdout
    meta["convkit_dirty"] = bool(dirty.strip())    # uncommitted engine changes in this run
    print(f"input {src} ({human(src.stat().st_size)}), load {' '.join(meta['load_before'])}, "
          f"free disk {human(os.statvfs(workdir).f_bavail * os.statvfs(workdir).f_frsize)}",
          file=sys.stderr)

    results: list[dict] = []
    t_all = time.perf_counter()
    try:
        for row in rows:
            if row.other is not None:
                tool = row.other[3]
                if tool is None or not tool.exists():
                    opt = "--comfyui-gguf" if row.rid == "9" else "--sdcpp"
                    msg = f"{row.other[0]} not found (pass {opt} PATH)"
                    print(f"row {row.rid} skipped: {msg}", file=sys.stderr)
                    results.append({"row": row.rid, "label": row.label, "regime": "warm",
                                    "other_name": row.other[0], "skipped": msg})
                    continue
                row_regimes = ["warm"]
            else:
                row_regimes = regimes
            for regime in row_regimes:
                print(f"row {row.rid}: {row.label} [{regime}]", file=sys.stderr)
                try:
                    results.append(measure_row(row, src, regime, args.repeat, workdir, kept,
                                               args.rss_limit_mb))
                except Exception as e:  # noqa: BLE001 -- one row failing must not end the run
                    print(f"row {row.rid} failed: {e!r}", file=sys.stderr)
                    results.append({"row": row.rid, "label": row.label, "regime": regime,
                                    "convkit_error": [repr(e)]})
            later = rows[rows.index(row) + 1:]
            for key in [k for k in kept if not any(r.needs == k for r in later)]:
                remove(kept.pop(key))    # no later row reads this kept output
    finally:
        for p in kept.values():
            remove(p)
    meta["load_after"] = loadavg()
    meta["total_seconds"] = round(time.perf_counter() - t_all, 1)

    print(plain(results))
    if args.markdown:
        print()
        print(markdown(results, meta))
    jpath = Path(args.json) if args.json else _common.DATA / (
        f"table-{datetime.date.today().isoformat()}"
        + ("" if default_input else f"-{src.stem}") + ".json")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"results: {jpath}", file=sys.stderr)


if __name__ == "__main__":
    main()
