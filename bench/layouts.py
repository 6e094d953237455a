"""Benchmark: layout changes (convert --layout, split, assemble) on the full-size SDXL fp32
checkpoint (~14 GB; bench/_common.full_size_checkpoint: real single-file key names and shapes,
random values).

Rows (each run in its own process: wall time including imports and planning; peak RSS = that
process's VmHWM):

  1a  convert IN OUT --layout diffusers --dtype fp32      convkit.convert.convert(layout=...)
  1b  convert IN OUT --layout diffusers --dtype fp16
  2   split IN -o DIR --for comfyui  (default dtype: keep)   convkit.layouts.split.split
  3   assemble --unet diffusion_models/... --clip-l/--clip-g text_encoders/... --vae vae/...
      -o OUT (row 2's parts back into one single file)    convkit.layouts.assemble.assemble
  4   convert DIR OUT --layout single-file (row 1a's fp32 folder back into one single file)

  3h  as 3, from the fp16 fixture (bench/verify.py's sdxl_full_f16: convert IN --dtype fp16;
      made here if missing): split --for comfyui of it, assembled back
  4h  as 4, from the fp16 fixture: convert --layout diffusers --dtype fp16 of it, back with
      convert DIR OUT --dtype fp16 --layout single-file
  (3h/4h: the same 2515 tensors at half the bytes, for when the disk cannot hold rows 3/4.)

Rows 3, 4, 3h and 4h must give back the original (IN, or the fp16 fixture): after every run
the output is compared with it tensor by tensor (names, dtypes, shapes and the raw bytes of
every tensor, streamed in 32 MB pieces from both files; the files' metadata is not compared),
in a separate, untimed process.

Every ratio is against an I/O floor measured in the same run, right next to the row's runs:
read the row's input files (the weight files of a folder input) and write, fsync'd, as many
bytes as that row's output (bench/_common.IO_FLOOR, generalised to several input files).
Regimes: ``warm`` reads the inputs once before every run, ``cold`` evicts them from the page
cache (posix_fadvise DONTNEED). Per row and regime: best and median of ``--repeat`` runs of the
row and of its floor (rep 0 runs the row first, rep 1 the floor first, ...); "best x" =
best / best floor, "median x" = median / median floor; peak RSS = the largest of the runs.
Targets: <= 1.1x the floor, peak RSS <= 1.5 GB (``--target-x``, ``--rss-limit-mb``).

Disk: every fp32 output is ~14 GB. Outputs are deleted as soon as they are measured (and
compared), except the last output of row 1a (row 4's input) and of row 2 (row 3's input), kept
until those rows are done; rows run in the order 1a, 4, 1b, 2, 3 (3h and 4h after 2 and 1a), so
that at most one input folder and one output exist at once: rows 3 and 4 need twice IN's size
free. ``--rows34 auto`` (the default) runs 3h/4h instead when the disk has less than that.
Free space is checked before every write (``--margin-gb`` spare); a row without room is
skipped, not failed. The row's own numbers (imports, planning, engine, split's manifest hashes:
from the process, not profiled) and a fingerprint of convkit's sources are in the results.

    python bench/layouts.py --tiny --repeat 1 --regime warm         # ~3 min: checks every row
    python bench/layouts.py --repeat 2 --regime both                 # 25-45 min, 2x14 GB free
    python bench/layouts.py --rows 2,3 --regime warm

Results: printed (plain table, --markdown), and written as JSON to
bench/data/layouts-<date>[-input].json (``--json PATH``); the last stdout line is the same
JSON in one line, ``{"bench": "layouts", ...}``. Check ``uptime`` first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common
from _common import (
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

# -- measured code (each runs in a fresh process through _common.run_measured, whose wrapper
# starts the clock ``t0`` before this code; argv[1] is a JSON file for the row's own numbers) --

_PRELUDE = """
import json, sys, time
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()   # what the convkit command does before importing torch
info_path = sys.argv[1]

def done(r, t1, **kw):
    t2 = time.perf_counter()
    st = r.stats
    d = {'import_s': t1 - t0, 'call_s': t2 - t1, 'engine_s': st.seconds,
         'plan_s': t2 - t1 - st.seconds, 'bytes_written': st.bytes_written,
         'bytes_read': st.bytes_read, 'tensors': st.tensors, 'items': len(r.plan.items),
         'files': len(r.plan.files), 'notes': list(r.plan.notes)[:12]}
    d.update(kw)
    with open(info_path, 'w') as f:
        json.dump(d, f)
"""

CONVERT = _PRELUDE + """
from convkit.convert import convert
t1 = time.perf_counter()
r = convert(sys.argv[2], sys.argv[3], sys.argv[4], layout=sys.argv[5], overwrite=True)
done(r, t1)
"""

# the manifest's sha256 pass is timed by wrapping the function that makes it (no change to
# what runs: split looks _manifest_maker up when it plans)
SPLIT = _PRELUDE + """
import convkit.layouts.split as S
manifest_s = []
_maker = S._manifest_maker
def _timed_maker(*a, **k):
    make = _maker(*a, **k)
    def timed(stage):
        t = time.perf_counter()
        try:
            return make(stage)
        finally:
            manifest_s.append(time.perf_counter() - t)
    return timed
S._manifest_maker = _timed_maker
t1 = time.perf_counter()
r = S.split(sys.argv[2], sys.argv[3], 'comfyui', overwrite=True)
done(r, t1, manifest_s=sum(manifest_s))
"""

ASSEMBLE = _PRELUDE + """
from convkit.layouts.assemble import assemble
unet, clip_l, clip_g, vae, out = sys.argv[2:7]
t1 = time.perf_counter()
r = assemble({'unet': [unet], 'clip_l': [clip_l], 'clip_g': [clip_g], 'vae': [vae]}, out,
             overwrite=True)
done(r, t1)
"""

# read several input files in turn, write out_bytes (in proportion to what was read), fsync:
# _common.IO_FLOOR over a list of files (and exact when out_bytes > in bytes)
IO_FLOOR = """
import os, sys
dst, out_bytes, srcs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
CH = 64 << 20
buf = bytearray(CH)
mv = memoryview(buf)
size = sum(os.path.getsize(s) for s in srcs)
ratio = out_bytes / size
done = written = 0
with open(dst, 'wb') as fo:
    for s in srcs:
        fi = os.open(s, os.O_RDONLY)
        n_s = os.fstat(fi).st_size
        off = 0
        while off < n_s:
            n = os.preadv(fi, [mv], off)
            if n <= 0:
                break
            off += n
            done += n
            want = (out_bytes if done == size else int(done * ratio)) - written
            while want > 0:
                k = min(want, CH)
                fo.write(mv[:k])
                written += k
                want -= k
        os.close(fi)
    fo.flush(); os.fsync(fo.fileno())
"""

# tensor-by-tensor equality of two safetensors files, streamed (not timed with the row)
COMPARE = """
import json, os, struct, sys
a, b, info = sys.argv[2:5]

def header(p):
    with open(p, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop('__metadata__', None)
    return 8 + n, h

ba, ha = header(a)
bb, hb = header(b)
missing = sorted(set(ha) - set(hb))
extra = sorted(set(hb) - set(ha))
meta = [k for k in ha if k in hb and (ha[k]['dtype'], ha[k]['shape'])
        != (hb[k]['dtype'], hb[k]['shape'])]
differ = []
CH = 32 << 20
fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
compared = nbytes = 0
for k in sorted(ha, key=lambda k: ha[k]['data_offsets'][0]):
    if k not in hb or k in meta:
        continue
    a0, a1 = ha[k]['data_offsets']
    b0, b1 = hb[k]['data_offsets']
    off, n = 0, a1 - a0
    while off < n:
        m = min(CH, n - off)
        if os.pread(fa, m, ba + a0 + off) != os.pread(fb, m, bb + b0 + off):
            differ.append(k)
            break
        off += m
    compared += 1
    nbytes += n
json.dump({'equal': not (missing or extra or meta or differ), 'tensors': len(ha),
           'compared': compared, 'bytes_compared': nbytes, 'missing': missing[:5],
           'n_missing': len(missing), 'extra': extra[:5], 'n_extra': len(extra),
           'dtype_or_shape_differ': meta[:5], 'n_dtype_or_shape_differ': len(meta),
           'values_differ': differ[:5], 'n_values_differ': len(differ)}, open(info, 'w'))
"""

# -- rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    rid: str
    label: str
    code: str
    out: str                                   # output name under the workdir
    args: Callable[[Path], tuple]              # output path -> argv after the info path
    inputs: Callable[[], list[Path]]           # files the row reads (floor, warm/evict)
    keep_as: str | None = None                 # keep the last output under this key
    needs: str | None = None                   # key of a kept output this row reads
    compare: bool = False                      # output must equal the original, tensor by tensor
    original: Callable[[], Path] | None = None  # what it must equal (default: the input)
    out_ratio: float = 1.0                     # output / input bytes, before the first run


ORDER = ["1a", "4", "4h", "1b", "2", "3", "3h"]  # run order (disk)
RANK = {"1a": 0, "1b": 1, "2": 2, "3": 3, "3h": 4, "4": 5, "4h": 6}     # report order



def _free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def source_fingerprint() -> str:
    """sha1 of convkit's sources and format data as they are now: the code is being edited
    while benches run, so every row records what it measured."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for p in sorted([*root.glob("convkit/**/*.py"), *root.glob("formats/**/*.toml")]):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]



def _weights(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _comfy_parts(folder: Path) -> dict[str, Path]:
    """part -> file of a split --for comfyui folder, from its manifest.json."""
    doc = json.loads((folder / "manifest.json").read_text())
    return {p["part"]: folder / p["files"][0]["path"] for p in doc["parts"]}


class Disk(Exception):
    pass


class Bench:
    def __init__(self, src: Path, workdir: Path, args):
        self.src, self.workdir, self.args = src, workdir, args
        self.kept: dict[str, Path] = {}
        self.made: list[Path] = []                 # files made here, removed at the end
        self.margin = int(args.margin_gb * 1e9)
        self.keep: set[str] = set()                # kept outputs a later row reads

    # -- kept outputs (inputs of rows 3 and 4) --------------------------------------------------
    def kept_path(self, key: str) -> Path:
        return self.workdir / f"layouts_keep_{key}"

    def half(self) -> Path:
        """The fp16 fixture (what bench/verify.py makes: convert SRC --dtype fp16), made here
        if missing (and then removed at the end)."""
        p = self.src.with_name(self.src.name.replace("_f32", "_f16")) \
            if "_f32" in self.src.name else self.workdir / f"{self.src.stem}_f16.safetensors"
        if not p.exists():
            self.check_disk(self.src.stat().st_size // 2, f"making {p.name}")
            print(f"  making {p.name} (unmeasured) ...", file=sys.stderr)
            info = self.workdir / "layouts_info.json"
            code = _PRELUDE + ("from convkit.convert import convert\n"
                               "convert(sys.argv[2], sys.argv[3], 'fp16')\n")
            r = run_measured(code, str(info), str(self.src), str(p))
            if "error" in r:
                raise RuntimeError(f"could not make {p.name}: {' '.join(r['error'])}")
            self.made.append(p)
            evict(p)
        return p

    def need(self, key: str) -> Path:
        """Row 1a's / row 2's output (made here, unmeasured, when that row did not keep it);
        ``*16``: the same from the fp16 fixture (rows 3h, 4h)."""
        p = self.kept.get(key)
        if p is not None and p.exists():
            return p
        p = self.kept_path(key)
        remove(p)
        src = self.half() if key.endswith("16") else self.src
        self.check_disk(src.stat().st_size, f"making {p.name}")
        print(f"  making {p.name} (unmeasured) ...", file=sys.stderr)
        info = self.workdir / "layouts_info.json"
        if key.startswith("diffusers"):
            r = run_measured(CONVERT, str(info), str(src), str(p),
                             "fp16" if key.endswith("16") else "fp32", "diffusers")
        else:
            r = run_measured(SPLIT, str(info), str(src), str(p))
        drop(info)
        if "error" in r:
            for line in r.get("stderr_tail", [])[-25:]:
                print(f"      {line}", file=sys.stderr)
            raise RuntimeError(f"could not make {p.name}: {' '.join(r['error'])}")
        evict_all([p])
        self.kept[key] = p
        return p

    def check_disk(self, need: int, what: str) -> None:
        free = _free(self.workdir)
        if free < need + self.margin:
            raise Disk(f"{what}: {human(free)} free, needs {human(need)} + "
                       f"{human(self.margin)} spare")

    # -- the rows -------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        s = str(self.src)

        def asm_args(key):
            def f(out):
                p = _comfy_parts(self.need(key))
                return (str(p["unet"]), str(p["clip_l"]), str(p["clip_g"]), str(p["vae"]),
                        str(out))
            return f

        return [
            Row("1a", "convert --layout diffusers --dtype fp32", CONVERT, "layouts_out_1a",
                lambda out: (s, str(out), "fp32", "diffusers"), lambda: [self.src],
                keep_as="diffusers"),
            Row("1b", "convert --layout diffusers --dtype fp16", CONVERT, "layouts_out_1b",
                lambda out: (s, str(out), "fp16", "diffusers"), lambda: [self.src],
                out_ratio=0.5),
            Row("2", "split --for comfyui (keep dtype)", SPLIT, "layouts_out_2",
                lambda out: (s, str(out)), lambda: [self.src], keep_as="comfyui"),
            Row("3", "assemble comfyui parts -> single file", ASSEMBLE,
                "layouts_out_3.safetensors", asm_args("comfyui"),
                lambda: list(_comfy_parts(self.need("comfyui")).values()), needs="comfyui",
                compare=True),
            Row("4", "convert diffusers fp32 --layout single-file", CONVERT,
                "layouts_out_4.safetensors",
                lambda out: (str(self.need("diffusers")), str(out), "fp32", "single-file"),
                lambda: _weights(self.need("diffusers")), needs="diffusers", compare=True),
            # the same from the fp16 fixture (half the bytes, same 2515 tensors): when the disk
            # cannot hold two fp32 copies next to the original
            Row("3h", "assemble comfyui parts (fp16 fixture)", ASSEMBLE,
                "layouts_out_3h.safetensors", asm_args("comfyui16"),
                lambda: list(_comfy_parts(self.need("comfyui16")).values()),
                needs="comfyui16", compare=True, original=self.half),
            Row("4h", "convert diffusers fp16 (fp16 fixture) --layout single-file", CONVERT,
                "layouts_out_4h.safetensors",
                lambda out: (str(self.need("diffusers16")), str(out), "fp16", "single-file"),
                lambda: _weights(self.need("diffusers16")), needs="diffusers16", compare=True,
                original=self.half),
        ]

    def measure(self, row: Row, regime: str, last: bool = True) -> dict:
        """``last``: the row's last regime (its last run's output is kept when a later row
        reads it; then that run is the row's last step, after its floor)."""
        wd = self.workdir
        out = wd / row.out
        floor_out = wd / "layouts_floor.bin"
        info = wd / "layouts_info.json"
        cmp_info = wd / "layouts_compare.json"
        inputs = row.inputs()
        in_bytes = sum(p.stat().st_size for p in inputs)
        runs: dict[str, list[dict]] = {"convkit": [], "floor": []}
        compares: list[dict] = []
        out_bytes: int | None = None

        def prepare_cache():
            if regime == "cold":
                evict_all(inputs)
            else:
                for p in inputs:
                    run_measured(WARM, str(p))

        keep = row.keep_as if row.keep_as in self.keep else None

        def run_tool(final=False):
            nonlocal out_bytes
            remove(out)
            drop(info)
            if keep:                   # its previous kept output: not on disk during this run
                remove(self.kept.pop(keep, self.kept_path(keep)))
            self.check_disk(out_bytes or int(in_bytes * row.out_ratio), f"row {row.rid}")
            prepare_cache()
            r = run_measured(row.code, str(info), *row.args(out))
            if info.exists():
                r["info"] = json.loads(info.read_text())
                drop(info)
            if "error" not in r:
                r["out_bytes"] = out_bytes = size_of(out)
                if row.compare:
                    drop(cmp_info)
                    orig = row.original() if row.original else self.src
                    c = run_measured(COMPARE, "", str(orig), str(out), str(cmp_info))
                    if "error" in c:
                        c = {"equal": False, "error": c["error"],
                             "stderr_tail": c.get("stderr_tail")}
                    else:
                        c.update(json.loads(cmp_info.read_text()))
                        drop(cmp_info)
                    r["compare"] = c
                    compares.append(c)
                if keep and final:
                    kp = self.kept_path(keep)
                    remove(kp)
                    out.rename(kp)
                    evict_all([kp])        # the rows that read it warm (or not) it themselves
                    self.kept[keep] = kp
            remove(out)
            runs["convkit"].append(r)
            _log(row, regime, "convkit", r)

        def run_floor():
            drop(floor_out)
            self.check_disk(out_bytes, f"row {row.rid} floor")
            prepare_cache()
            r = run_measured(IO_FLOOR, str(floor_out), str(out_bytes), *map(str, inputs))
            drop(floor_out)
            runs["floor"].append(r)
            _log(row, regime, "io-floor", r)

        load_before = loadavg()
        fp_before = source_fingerprint()
        n = self.args.repeat
        for rep in range(n):
            # the floor needs the output size: the row goes first in rep 0, then alternate; the
            # run whose output is kept goes last (never two copies and a floor on disk at once)
            steps = ["tool", "floor"] if rep % 2 == 0 else ["floor", "tool"]
            final = keep and last and rep == n - 1
            if final and rep > 0:
                steps = ["floor", "tool"]
            for step in steps:
                if step == "floor":
                    if out_bytes is not None:  # else the row failed: nothing to compare with
                        run_floor()
                else:
                    run_tool(final=bool(final))
        remove(out)
        res = {"row": row.rid, "label": row.label, "regime": regime,
               "inputs": [str(p) for p in inputs], "input_bytes": in_bytes,
               "load_before": load_before, "load_after": loadavg(),
               "convkit_source": fp_before}
        if source_fingerprint() != fp_before:
            res["convkit_source_changed"] = True     # edited while this row ran
            print(f"  [{row.rid} {regime}] note: convkit's sources changed during this row",
                  file=sys.stderr)
        res.update(summarise_runs("convkit", runs["convkit"]))
        res.update(summarise_runs("floor", runs["floor"]))
        if "convkit_best_s" in res and "floor_best_s" in res:
            res["best_x"] = res["convkit_best_s"] / res["floor_best_s"]
            res["median_x"] = res["convkit_median_s"] / res["floor_median_s"]
        ok = [r for r in runs["convkit"] if "info" in r]
        if ok:    # the row's own breakdown, from its best run
            best = min(ok, key=lambda r: r["seconds"])
            res["breakdown"] = {k: best["info"][k] for k in
                                ("import_s", "plan_s", "engine_s", "manifest_s")
                                if k in best["info"]}
            res["breakdown"]["cpu_user"] = best.get("cpu_user")
            res["breakdown"]["cpu_sys"] = best.get("cpu_sys")
            res["notes"] = best["info"].get("notes", [])
        if row.compare:
            res["equal"] = bool(compares) and all(c.get("equal") for c in compares)
            res["compares"] = compares
        if res.get("convkit_peak_rss_mb", 0) > self.args.rss_limit_mb:
            res["rss_warning"] = True
        if res.get("best_x", 0) > self.args.target_x:
            res["x_warning"] = True
        res["runs"] = runs
        return res


def evict_all(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            for f in p.rglob("*"):
                if f.is_file():
                    evict(f)
        else:
            evict(p)



def _log(row: Row, regime: str, what: str, r: dict) -> None:
    if "error" in r:
        print(f"  [{row.rid} {regime}] {what}: FAILED {r['error']}", file=sys.stderr)
        for line in r.get("stderr_tail", [])[-25:]:
            print(f"      {line}", file=sys.stderr)
        return
    extra = f", out {human(r['out_bytes'])}" if "out_bytes" in r else ""
    if "info" in r:
        i = r["info"]
        extra += (f" (import {i['import_s']:.1f} s, plan {i['plan_s']:.1f} s, engine "
                  f"{i['engine_s']:.1f} s" + (f", manifest {i['manifest_s']:.1f} s"
                                              if "manifest_s" in i else "") + ")")
    if "compare" in r:
        c = r["compare"]
        extra += (f", equal to the original ({c['compared']} tensors)" if c.get("equal")
                  else f", NOT EQUAL: {json.dumps({k: v for k, v in c.items() if v})}")
    print(f"  [{row.rid} {regime}] {what}: {r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB"
          f"{extra}", file=sys.stderr)


# -- output -----------------------------------------------------------------------------------


def _eq(r: dict) -> str:
    if "equal" not in r:
        return "—"
    return "yes" if r["equal"] else "NO"


def plain(results: list[dict], target_x: float, rss_limit: float) -> str:
    out = [(f"{'#':<3} {'row':<44} {'regime':<6} {'floor s':>8} {'best s':>8} {'x':>6} "
            f"{'fl med':>8} {'med s':>8} {'x':>6} {'RSS MB':>7} {'out':>9} {'equal':>5}")]
    for r in results:
        name = r["label"][:44]
        if "skipped" in r:
            out.append(f"{r['row']:<3} {name:<44} {r['regime']:<6} skipped: {r['skipped']}")
            continue
        if "convkit_best_s" not in r:
            out.append(f"{r['row']:<3} {name:<44} {r['regime']:<6} FAILED: "
                       f"{r.get('convkit_error')}")
            continue
        flags = []
        if r.get("x_warning"):
            flags.append(f"> {target_x}x")
        if r.get("rss_warning"):
            flags.append(f"> {rss_limit:.0f} MB")
        out.append(f"{r['row']:<3} {name:<44} {r['regime']:<6} {fmt(r.get('floor_best_s')):>8} "
                   f"{r['convkit_best_s']:>8.2f} {fmt(r.get('best_x')):>6} "
                   f"{fmt(r.get('floor_median_s')):>8} {r['convkit_median_s']:>8.2f} "
                   f"{fmt(r.get('median_x')):>6} {r['convkit_peak_rss_mb']:>7.0f} "
                   f"{human(r.get('convkit_out_bytes', 0)):>9} {_eq(r):>5}"
                   + ("  " + ", ".join(flags) if flags else ""))
    out += ["", (f"{'#':<3} {'regime':<6} {'import s':>9} {'plan s':>8} {'engine s':>9} "
                 f"{'manifest s':>11} {'cpu user':>9} {'cpu sys':>8}   (best run)")]
    for r in results:
        b = r.get("breakdown")
        if b:
            out.append(f"{r['row']:<3} {r['regime']:<6} {b['import_s']:>9.2f} {b['plan_s']:>8.2f} "
                       f"{b['engine_s']:>9.2f} {fmt(b.get('manifest_s')):>11} "
                       f"{fmt(b.get('cpu_user')):>9} {fmt(b.get('cpu_sys')):>8}")
    return "\n".join(out)


def markdown(results: list[dict], meta: dict) -> str:
    out = [(f"Input: `{meta['input']}` ({human(meta['input_bytes'])}); {meta['date']}, "
            f"{meta['nproc']} CPUs, load before {' '.join(meta['load_before'])}, after "
            f"{' '.join(meta['load_after'])}; --repeat {meta['repeat']}."), "",
           ("| # | row | regime | floor best s | best s | best × floor | floor median s | "
            "median s | median × floor | peak RSS | out | equal |"),
           "| --- | --- | --- |" + " ---: |" * 8 + " --- |"]
    for r in results:
        if "convkit_best_s" not in r:
            why = r.get("skipped") or " ".join(r.get("convkit_error") or ["?"])
            out.append(f"| {r['row']} | {r['label']} | {r['regime']} | failed: {why} |"
                       + " |" * 8)
            continue
        out.append(
            f"| {r['row']} | {r['label']} | {r['regime']} | {fmt(r.get('floor_best_s'))} | "
            f"{r['convkit_best_s']:.2f} | {fmt(r.get('best_x'))} | "
            f"{fmt(r.get('floor_median_s'))} | {r['convkit_median_s']:.2f} | "
            f"{fmt(r.get('median_x'))} | {r['convkit_peak_rss_mb']:,.0f} MB | "
            f"{human(r.get('convkit_out_bytes', 0))} | {_eq(r)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--regime", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--rows", default="all",
                    help="comma list of 1a,1b,2,3,4,3h,4h (default: 1a,1b,2 and 3,4 or 3h,4h "
                         "as --rows34 says)")
    ap.add_argument("--rows34", choices=["auto", "fp32", "fp16"], default="auto",
                    help="rows 3 and 4 on the fp32 original (they need twice its size free), "
                         "or 3h and 4h on the fp16 fixture (half); auto: fp32 if the disk has "
                         "room")
    ap.add_argument("--input", help="an SDXL single file to use instead of the full-size one")
    ap.add_argument("--tiny", action="store_true",
                    help="convkit's tiny SDXL (real layout) instead: an end-to-end check")
    ap.add_argument("--workdir", default=None, help="outputs (default bench/data)")
    ap.add_argument("--target-x", type=float, default=1.1)
    ap.add_argument("--rss-limit-mb", type=float, default=1500.0)
    ap.add_argument("--margin-gb", type=float, default=1.5,
                    help="free space to leave on the workdir's disk")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown too")
    ap.add_argument("--json", help="result file (default bench/data/layouts-<date>[-input].json)")
    args = ap.parse_args()

    workdir = Path(args.workdir) if args.workdir else _common.DATA
    workdir.mkdir(parents=True, exist_ok=True)
    src = bench_source(args, workdir)
    default_input = not (args.tiny or args.input)

    bench = Bench(src, workdir, args)
    rows = {r.rid: r for r in bench.rows()}
    size = src.stat().st_size
    half_note = None
    if args.rows == "all":
        mode = args.rows34
        if mode == "auto":
            # row 4 runs with row 1a's folder on disk, row 3 with row 2's: input + output
            need = 2 * size + int(args.margin_gb * 1e9)
            mode = "fp32" if _free(workdir) >= need else "fp16"
            if mode == "fp16":
                half_note = (f"rows 3h/4h instead of 3/4: {human(_free(workdir))} free, rows 3 "
                             f"and 4 need {human(need)} (input folder + output + margin)")
                print(half_note, file=sys.stderr)
        wanted = ["1a", "1b", "2"] + (["3", "4"] if mode == "fp32" else ["3h", "4h"])
    else:
        wanted = args.rows.split(",")
    unknown = set(wanted) - set(rows)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; rows are {sorted(rows)}")
    run_order = [rid for rid in ORDER if rid in wanted]
    bench.keep = {rows[r].needs for r in run_order if rows[r].needs}
    regimes = ["cold", "warm"] if args.regime == "both" else [args.regime]
    meta = {"bench": "layouts", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "input": str(src), "input_bytes": src.stat().st_size, "repeat": args.repeat,
            "regimes": regimes, "nproc": os.cpu_count(), "load_before": loadavg(),
            "python": sys.version.split()[0], "target_x": args.target_x,
            "rss_limit_mb": args.rss_limit_mb, "free_disk_before": _free(workdir),
            "rows": run_order, "rows34_note": half_note,
            "convkit_source_before": source_fingerprint()}
    try:
        meta["convkit_git"] = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
            text=True, check=True).stdout.strip()
        meta["convkit_dirty"] = bool(subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--", ":/convkit",
             ":/formats"], capture_output=True, text=True, check=False).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    print(f"input {src} ({human(src.stat().st_size)}), load {' '.join(meta['load_before'])}, "
          f"free disk {human(_free(workdir))}; rows in the order {', '.join(run_order)}",
          file=sys.stderr)

    results: list[dict] = []
    t_all = time.perf_counter()
    try:
        for i, rid in enumerate(run_order):
            row = rows[rid]
            for regime in regimes:
                print(f"row {rid}: {row.label} [{regime}]", file=sys.stderr)
                try:
                    results.append(bench.measure(row, regime, last=regime == regimes[-1]))
                except Exception as e:  # noqa: BLE001 -- one row failing must not end the run
                    print(f"row {rid} failed: {e!r}", file=sys.stderr)
                    key = "skipped" if isinstance(e, Disk) else "convkit_error"
                    results.append({"row": rid, "label": row.label, "regime": regime,
                                    key: str(e) if key == "skipped" else [repr(e)]})
            later = run_order[i + 1:]
            for key in [k for k in bench.kept if not any(rows[r].needs == k for r in later)]:
                remove(bench.kept.pop(key))     # no later row reads this kept output
    finally:
        for p in list(bench.kept.values()) + bench.made:
            remove(p)
        for name in ("layouts_floor.bin", "layouts_info.json", "layouts_compare.json"):
            drop(workdir / name)
    meta["load_after"] = loadavg()
    meta["convkit_source_after"] = source_fingerprint()
    meta["total_seconds"] = round(time.perf_counter() - t_all, 1)

    results.sort(key=lambda r: (RANK[r["row"]], r["regime"]))
    print(plain(results, args.target_x, args.rss_limit_mb))
    if args.markdown:
        print()
        print(markdown(results, meta))
    jpath = Path(args.json) if args.json else _common.DATA / (
        f"layouts-{datetime.date.today().isoformat()}"
        + ("" if default_input else f"-{src.stem}") + ".json")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "layouts", "meta": meta, "rows": results}
    jpath.write_text(json.dumps(doc, indent=1))
    print(f"results: {jpath}", file=sys.stderr)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
