"""Shared bench helpers: full-size random checkpoints on disk, timing subprocesses, I/O floor.

Benchmarks are never run by the test suite. Every ratio is against a baseline measured in the
same run, because these machines are noisy.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(os.environ.get("CONVKIT_BENCH_DATA", Path(__file__).parent / "data"))


def full_size_checkpoint(arch: str = "sdxl", dtype: str = "F32", layout: str | None = None) -> Path:
    """A full-size checkpoint with the real single-file key names and shapes, random values.

    ``layout``: one of the architecture's layouts (e.g. ``mmdit``, the SD3 transformer alone);
    default its single file. Generated once (streaming, through convkit's own writer) and kept
    in bench/data/.
    """
    from convkit.tiny.full_size import full_size_shapes
    from convkit.writer import OutSpec, SafetensorsWriter

    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{arch}_{layout or 'full'}_{dtype.lower()}.safetensors"
    if path.exists():
        return path
    shapes = full_size_shapes(arch, layout)
    specs = [OutSpec(k, "I64" if k.endswith("position_ids") else dtype, tuple(s))
             for k, s in shapes.items()]
    total = sum(s.nbytes for s in specs)
    print(f"generating {path} ({len(specs)} tensors, {total / 1e9:.2f} GB) ...", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    with SafetensorsWriter(path, specs, {"convkit.bench": "random full-size " + arch}) as w:
        for s in specs:
            if s.dtype == "I64":
                t = torch.arange(math.prod(s.shape), dtype=torch.int64).reshape(s.shape)
            else:
                t = (torch.randn(s.shape, generator=g) * 0.02).to(tdt)
            w.write(s.name, t)
    print(f"generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (cold-cache runs), without root."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_measured(code: str, *args: str) -> dict:
    """Run python code in a fresh process; it prints one JSON line. Adds wall time + peak RSS.

    Peak RSS is the child's VmHWM (ru_maxrss would include the parent's peak: on Linux it
    survives fork+exec).
    """
    wrapper = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "sec = time.perf_counter() - t0\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "tm = __import__('os').times()\n"
        "r = {'seconds': sec, 'peak_rss_mb': int(hwm.split()[1]) / 1024,\n"
        "     'cpu_user': tm.user, 'cpu_sys': tm.system}\n"
        "print('RESULT ' + json.dumps(r))\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, check=False)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        # "error": the last line (what the scripts print); "stderr_tail": the traceback
        return {"error": lines[-1:] or ["failed"], "returncode": p.returncode,
                "stderr_tail": lines[-40:]}
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[7:])


IO_FLOOR = """
import os, sys
src, dst, out_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
CH = 64 << 20
buf = bytearray(CH)
fi = os.open(src, os.O_RDONLY)
size = os.fstat(fi).st_size
ratio = out_bytes / size
written = 0
with open(dst, 'wb') as fo:
    off = 0
    mv = memoryview(buf)
    while off < size:
        n = os.preadv(fi, [mv], off)
        off += n
        want = int(off * ratio) - written
        if want > 0:
            fo.write(mv[:want])
            written += want
    fo.flush(); os.fsync(fo.fileno())
os.close(fi)
"""


WARM = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = bytearray(64 << 20)
off = 0
while True:
    n = os.preadv(fd, [buf], off)
    if n <= 0:
        break
    off += n
"""


def drop(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def report(rows: list[tuple[str, dict]], baseline: str) -> str:
    base = dict(rows)[baseline]
    out = [f"{'variant':<28} {'best s':>8} {'x floor':>8} {'median s':>9} {'x floor':>8} "
           f"{'peak RSS MB':>12}"]
    for name, r in rows:
        if "error" in r:
            out.append(f"{name:<28} failed: {r['error']}")
            continue
        med = r.get("median_seconds", r["seconds"])
        bmed = base.get("median_seconds", base["seconds"])
        out.append(f"{name:<28} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>8.3f} "
                   f"{med:>9.2f} {med / bmed:>8.3f} {r['peak_rss_mb']:>12.0f}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- bench tables


def human(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def size_of(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        drop(p)


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def fmt(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def summarise_runs(prefix: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    d: dict = {}
    if not ok:
        if runs:
            d[f"{prefix}_error"] = runs[0].get("error")
            d[f"{prefix}_traceback"] = runs[0].get("stderr_tail")
        return d
    secs = [r["seconds"] for r in ok]
    d[f"{prefix}_best_s"] = min(secs)
    d[f"{prefix}_median_s"] = statistics.median(secs)
    d[f"{prefix}_all_s"] = [round(x, 3) for x in secs]
    d[f"{prefix}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    if "out_bytes" in ok[-1]:
        d[f"{prefix}_out_bytes"] = ok[-1]["out_bytes"]
    if len(ok) < len(runs):
        d[f"{prefix}_failed_runs"] = len(runs) - len(ok)
        bad = next(r for r in runs if "error" in r)
        d[f"{prefix}_error"] = bad.get("error")
        d[f"{prefix}_traceback"] = bad.get("stderr_tail")
    return d


def bench_source(args, workdir: Path) -> Path:
    """The input a bench runs on: --tiny (convkit's tiny SDXL, real layout), --input FILE, or
    the full-size random SDXL."""
    if args.tiny:
        src = workdir / "table_tiny_sdxl.safetensors"
        if not src.exists():
            from convkit import tiny
            tiny.save_single_file(tiny.build("sdxl", 0), str(src))
        return src
    if args.input:
        return Path(args.input)
    return full_size_checkpoint("sdxl", "F32")
