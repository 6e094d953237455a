"""Benchmark: convkit quantize on a full-size SD3.5 Large transformer (8.15 B parameters, BF16).

Input: ``bench/data/sd35_large_mmdit_bf16.safetensors``, generated once by
``_common.full_size_checkpoint("sd35_large", "BF16", "mmdit")``: the real MMDiT reference key
names and shapes (923 tensors incl. the 3-D ``pos_embed``, 16.29 GB; the layout of a
transformer-only file, no prefix), random N(0, 0.02) values. ``--input FILE`` runs another file.

Each target runs as the ``convkit quantize SRC OUT --to TARGET --json`` command in its own
process (verification on: the output is reopened and every tensor checked; the error of every
quantized tensor is measured in the same pass). Compared in the same run with the I/O floor of
that target: read the whole input and write (fsync'd) as many bytes as the target's output.
Wall time is that of the whole process (interpreter start and imports included, for the floor
too); peak RSS is the command's own ``ru_maxrss`` as ``/usr/bin/time`` reports it (the process
``time`` forks, so none of this script's memory is counted). Every variant runs ``--repeat``
times, interleaved; best, median and all times are kept. Outputs are deleted after each run.

    python bench/sd3.py [--repeat 2] [--targets gguf:Q4_K_S,fp8-scaled] [--regime warm|cold|both]

"warm" reads the input once before each run (16 GB: on a 24 GB machine the page cache holds most,
not necessarily all, of it); "cold" evicts it first. Results: a table on stdout and
``bench/data/sd3-<date>.json`` (also: output sizes, tensor types and the tensors that fell back
from a K-quant type because their rows are not multiples of 256).

Results of the first run are in docs/benchmarks.md ("SD3.5 Large").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, IO_FLOOR, WARM, drop, evict, full_size_checkpoint, loadavg

TIME = "/usr/bin/time"
PEAK_RSS_LIMIT_MB = 1.5e9 / 2**20      # the "peak RSS <= 1.5 GB"


def convkit_cmd() -> list[str]:
    exe = shutil.which("convkit") or str(Path(sys.executable).with_name("convkit"))
    return [exe]


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall seconds (measured here), peak RSS, CPU, stdout."""
    tf = DATA / f".sd3bench-time-{os.getpid()}"
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-o", str(tf), "-f", "%M %U %S", *cmd], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=False)
    sec = time.perf_counter() - t0
    last = tf.read_text().strip().splitlines()[-1] if tf.exists() else ""
    drop(tf)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"error": lines[-1:] or ["failed"], "returncode": p.returncode,
                "stderr_tail": lines[-30:]}
    kb, user, sys_ = last.split()
    return {"seconds": sec, "peak_rss_mb": int(kb) / 1024, "cpu_user": float(user),
            "cpu_sys": float(sys_), "stdout": p.stdout}


def plan(src: Path, out: Path, target: str) -> dict:
    """The dry run's plan (--json): out_bytes, types, fallbacks; raises with the refusal."""
    p = subprocess.run([*convkit_cmd(), "quantize", str(src), str(out), "--to", target,
                        "--dry-run", "--json", "--overwrite", "-q"], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{target}: convkit refused the dry run: "
                         + (p.stderr or p.stdout).strip().splitlines()[-1])
    return json.loads(p.stdout)


def fallback_summary(fallbacks: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in fallbacks:
        k = f"{f['wanted']} -> {f['used']}"
        out[k] = out.get(k, 0) + 1
    return out


def meminfo() -> dict[str, int]:
    d = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":")
        if k in ("MemTotal", "MemAvailable", "Cached"):
            d[k + "_mb"] = int(v.split()[0]) // 1024
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--targets", default="gguf:Q4_K_S,fp8-scaled")
    ap.add_argument("--regime", choices=["warm", "cold", "both"], default="warm")
    ap.add_argument("--input", help="another input file (default: the generated SD3.5 Large)")
    ap.add_argument("--out-json", help="results file (default bench/data/sd3-<date>.json)")
    args = ap.parse_args()

    src = Path(args.input) if args.input else full_size_checkpoint("sd35_large", "BF16", "mmdit")
    size = src.stat().st_size
    print(f"input {src} ({size / 1e9:.2f} GB); load average {loadavg()}", file=sys.stderr)
    targets = args.targets.split(",")
    outs = {t: DATA / ("bench_sd3." + ("gguf" if t.startswith("gguf:") else "safetensors"))
            for t in targets}
    plans = {t: plan(src, outs[t], t) for t in targets}
    for t, p in plans.items():
        print(f"  {t}: reads {p['in_bytes'] / 1e9:.2f} GB, writes {p['out_bytes'] / 1e9:.2f} GB; "
              f"types {p['types']}; fallbacks {fallback_summary(p['fallbacks'])}", file=sys.stderr)

    floor_out = DATA / "bench_sd3.floor"
    variants: list[tuple[str, str, list[str]]] = []   # (name, target, command)
    for t in targets:
        variants.append((f"io-floor ({t})", t, [sys.executable, "-c", IO_FLOOR, str(src),
                                                str(floor_out), str(plans[t]["out_bytes"])]))
        variants.append((f"quantize {t}", t, [*convkit_cmd(), "quantize", str(src), str(outs[t]),
                                              "--to", t, "--json", "-q", "--overwrite"]))
    regimes = ["warm", "cold"] if args.regime == "both" else [args.regime]
    runs: dict[str, dict[str, list[dict]]] = {g: {n: [] for n, _, _ in variants} for g in regimes}
    load_before = loadavg()
    t_start = time.perf_counter()
    for rep in range(args.repeat):
        for regime in regimes:
            for name, t, cmd in variants:
                drop(floor_out)
                drop(outs[t])
                if regime == "cold":
                    evict(src)
                else:
                    subprocess.run([sys.executable, "-c", WARM, str(src)], check=True)
                mem = meminfo()
                r = timed(cmd)
                r.update({"rep": rep, "load": loadavg(), **mem})
                out = outs[t] if name.startswith("quantize ") else floor_out
                r["out_file_bytes"] = out.stat().st_size if out.exists() else None
                drop(out)
                stdout = r.pop("stdout", "")
                if name.startswith("quantize ") and "error" not in r:
                    j = json.loads(stdout)
                    r["convkit"] = {k: j.get(k) for k in ("seconds", "verify_seconds",
                                                          "bytes_written", "verified_tensors",
                                                          "tensors", "types")}
                    r["convkit"]["fallbacks"] = fallback_summary(j.get("fallbacks", []))
                    e = j.get("error") or {}
                    r["convkit"]["rel_rmse"] = e.get("rel_rmse")
                    r["convkit"]["max_rel_rmse"] = e.get("max_rel_rmse")
                    r["convkit"]["by_type"] = e.get("by_type")
                    r["convkit"]["worst"] = e.get("worst")
                runs[regime][name].append(r)
                print(f"  rep {rep} {regime}: {name}: "
                      + json.dumps({k: v for k, v in r.items() if k not in ("convkit", "stderr_tail")}),
                      file=sys.stderr)

    # ------------------------------------------------------------------ summary
    rows = []
    for regime in regimes:
        for name, t, _ in variants:
            ok = [r for r in runs[regime][name] if "error" not in r]
            row = {"regime": regime, "variant": name, "target": t, "runs": len(runs[regime][name]),
                   "failed": len(runs[regime][name]) - len(ok)}
            if not ok:
                bad = runs[regime][name][0] if runs[regime][name] else {}
                row.update({"error": bad.get("error"), "stderr_tail": bad.get("stderr_tail")})
                rows.append(row)
                continue
            secs = [r["seconds"] for r in ok]
            row.update({"best_s": min(secs), "median_s": statistics.median(secs),
                        "all_s": [round(s, 2) for s in secs],
                        "spread_pct": round(100 * (max(secs) - min(secs)) / min(secs), 1),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                        "out_file_bytes": ok[-1]["out_file_bytes"]})
            if "convkit" in ok[-1]:
                row["convkit"] = ok[-1]["convkit"]
                row["convkit_internal_best_s"] = min(r["convkit"]["seconds"] for r in ok)
            rows.append(row)
    for row in rows:
        if row["variant"].startswith("quantize ") and "best_s" in row:
            floor = next(r for r in rows if r["regime"] == row["regime"]
                         and r["variant"] == f"io-floor ({row['target']})")
            if "best_s" in floor:
                row["best_x_floor"] = round(row["best_s"] / floor["best_s"], 3)
                row["median_x_floor"] = round(row["median_s"] / floor["median_s"], 3)
            row["rss_within_1_5_gb"] = row["peak_rss_mb"] <= PEAK_RSS_LIMIT_MB

    hdr = (f"{'regime':<6} {'variant':<26} {'best s':>8} {'median s':>9} {'spread':>7} "
           f"{'best×floor':>10} {'med×floor':>9} {'peak RSS MB':>11} {'output':>10}")
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['regime']:<6} {r['variant']:<26} failed: {r['error']}")
            continue
        out = f"{r['out_file_bytes'] / 1e9:.2f} GB" if r.get("out_file_bytes") else "—"
        print(f"{r['regime']:<6} {r['variant']:<26} {r['best_s']:>8.2f} {r['median_s']:>9.2f} "
              f"{r['spread_pct']:>6.1f}% {r.get('best_x_floor', 1.0):>10.3f} "
              f"{r.get('median_x_floor', 1.0):>9.3f} {r['peak_rss_mb']:>11.0f} {out:>10}")
    for t, p in plans.items():
        fb = fallback_summary(p["fallbacks"])
        print(f"{t}: {p['tensors']} tensors, types {p['types']}; "
              f"{len(p['fallbacks'])} fell back ({fb or 'none'})")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    res = {"bench": "sd3", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": commit, "note": "2 shared cores: other engineers ran tests during the run",
           "cpu": next((l.split(":", 1)[1].strip()
                        for l in Path("/proc/cpuinfo").read_text().splitlines()
                        if l.startswith("model name")), None),
           "nproc": os.cpu_count(), "load_before": load_before, "load_after": loadavg(),
           "minutes": round((time.perf_counter() - t_start) / 60, 1),
           "input": {"path": str(src), "bytes": size},
           "plans": {t: {k: p.get(k) for k in ("tensors", "types", "in_bytes", "out_bytes", "notes")}
                     | {"fallbacks": p["fallbacks"],
                        "fallback_counts": fallback_summary(p["fallbacks"])}
                     for t, p in plans.items()},
           "rows": rows, "runs": runs}
    path = Path(args.out_json) if args.out_json else \
        DATA / f"sd3-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
