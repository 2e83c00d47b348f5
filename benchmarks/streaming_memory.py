"""Peak memory of sampling + estimating with draws streamed to disk against in memory.

For each probe-set size P and each mode, a fresh subprocess samples K components
(4 chains × 200 draws, SGLD, linear–Gaussian model of ``bayes_susc.checks.ground_truth``: P
probe items, each one loss per draw) and builds the response matrix over them
(``build_response_matrix``, default ``ess_t`` intervals):

- ``memory``: ``sample(...)`` keeps every draw in memory; all K runs are held for
  the matrix (float64: 4 × 200 × P × 8 bytes per component);
- ``store``: ``sample(..., store=DIR)`` streams draws to zarr in chunks and returns a
  lazily backed result; the matrix reads ``probe_loss`` in blocks of ``--probe-chunk``
  items.

The child reports its peak resident set size (``resource.getrusage`` maxrss) after
sampling and at the end, beside its RSS after imports and setup (the baseline), so
"working memory" = peak − baseline. Prints a table and writes ``--out DIR/results.json``
(atomically).

    python -m benchmarks.streaming_memory [--quick] [--sizes 1000 10000 100000]
        [--components 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NUM_CHAINS, NUM_DRAWS = 4, 200


def _rss_mib() -> float:
    """Current resident set size, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, num_probe: int, components: int, probe_chunk: int, workdir: Path) -> dict:
    """One measurement in this (fresh) process; returns the figures."""
    import numpy as np
    import torch

    from bayes_susc import sample
    from bayes_susc.checks.ground_truth import LinearGaussianProblem, torch_local_posterior
    from bayes_susc.estimation.response_matrix import build_response_matrix

    torch.set_num_threads(1)
    setups = []
    for k in range(components):
        # Components: different pairs of free coordinates of a 6-feature model.
        free = sorted({k % 6, (k + 1 + k // 6) % 6})
        problem = LinearGaussianProblem.make(n=200, p=6, n_probe=num_probe, free=free, seed=k)
        setups.append(torch_local_posterior(problem))
    baseline = _rss_mib()
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    for k, (post, eval_b, probe_b) in enumerate(setups):
        kw = dict(
            eval_data=eval_b,
            probe_data=probe_b,
            num_chains=NUM_CHAINS,
            num_draws=NUM_DRAWS,
            num_burnin=50,
            seed=k,
            step_size=1e-3,
            progress=False,
        )
        if mode == "store":
            kw["store"] = workdir / f"c{k}.zarr"
        runs[f"c{k}"] = sample(post, "sgld", **kw)
    t_sample = time.perf_counter() - t0
    peak_sample = _maxrss_mib()
    t0 = time.perf_counter()
    extra = {"probe_chunk": probe_chunk} if mode == "store" else {}
    matrix = build_response_matrix(runs, **extra)
    t_matrix = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
    return {
        "mode": mode,
        "num_probe": num_probe,
        "components": components,
        "chains": NUM_CHAINS,
        "draws": NUM_DRAWS,
        "probe_chunk": probe_chunk if mode == "store" else None,
        "baseline_rss_mib": round(baseline, 1),
        "peak_after_sampling_mib": round(peak_sample, 1),
        "peak_mib": round(_maxrss_mib(), 1),
        "working_mib": round(_maxrss_mib() - baseline, 1),
        "draws_bytes_per_component_mib": round(NUM_CHAINS * NUM_DRAWS * num_probe * 8 / 2**20, 1),
        "store_disk_mib": round(disk / 2**20, 1),
        "sample_s": round(t_sample, 2),
        "matrix_s": round(t_matrix, 2),
        "chi_finite_fraction": float(np.isfinite(matrix["chi"].values).mean()),
    }


def _run_child(mode: str, num_probe: int, components: int, probe_chunk: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.streaming_memory",
            "--child",
            mode,
            str(num_probe),
            str(components),
            str(probe_chunk),
            str(workdir),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, p, k, chunk, workdir = sys.argv[2:7]
        print(json.dumps(child(mode, int(p), int(k), int(chunk), Path(workdir))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1000 and 10000, 2 components")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--probe-chunk", type=int, default=1024)
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=1.0,
        help="skip in-memory runs whose draws alone would exceed this",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_streaming"))
    args = parser.parse_args()
    sizes, components = args.sizes, args.components
    if args.quick:
        sizes, components = [1000, 10000], 2
    rows = []
    for p in sizes:
        for mode in ("memory", "store"):
            need = components * NUM_CHAINS * NUM_DRAWS * p * 8 / 2**30
            if mode == "memory" and need > args.max_memory_gib:
                print(f"skip memory P={p}: draws alone {need:.1f} GiB > --max-memory-gib")
                continue
            row = _run_child(mode, p, components, args.probe_chunk)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        "| probe items | mode | draws / component (MiB) | peak RSS (MiB) | peak − baseline "
        "(MiB) | store on disk (MiB) | sample (s) | matrix (s) |"
    )
    print(f"\n{components} components × {NUM_CHAINS} chains × {NUM_DRAWS} draws, float64\n")
    print(header)
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['num_probe']:,} | {r['mode']} | {r['draws_bytes_per_component_mib']} | "
            f"{r['peak_mib']:.0f} | {r['working_mib']:.0f} | {r['store_disk_mib']} | "
            f"{r['sample_s']} | {r['matrix_s']} |"
        )
    from bayes_susc.storage.draws import atomic_write

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "argv": sys.argv[1:], "python": sys.version.split()[0]}
    atomic_write(args.out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(payload)))
    print(f"\nwrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
