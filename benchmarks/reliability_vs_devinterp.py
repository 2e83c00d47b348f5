"""Time to the same reliability, against devinterp 2.0.1 (issue 19, deliverable 4).

Wall clock at equal settings (``benchmarks.vs_devinterp``) says how fast each side
draws; it does not say how long each needs before its numbers can be trusted. Here both
sides sample the heads of the same problem (``benchmarks.vs_devinterp``'s
TransformerLens model, data, nβ, γ, chains) for ``--draws`` kept draws per chain:

- the peer: ``devinterp.slt.susceptibilities.susceptibilities`` with its SGLD at
  ε = 1e-3 (its only sampler for this call), which also needs its unrestricted "full"
  run; its per-token draws are read back from its zarr stores after the timing;
- ours: ``bayes_susc.sample`` with the demo's kernel, the setting the demo-heads study
  names (``python -m diagnostics.kernels_heads``; ``DemoSettings()``), vectorized
  chains, no unrestricted run (the pooled estimator does not need one); and the same
  SGLD as the peer, to separate the kernel's share from the implementation's.

Every side's draws are judged by the same diagnostics
(:func:`bayes_susc.checks.until.diagnose_entries`: R-hat ≤ 1.01 and min(bulk, tail) ESS
≥ 100 of each entry's pooled product series, at least 800 pooled draws) on prefixes of
25, 50, ... draws per chain. The reliability level is the largest share of entries that
every side reaches within its draws (capped at 0.95); each side's draws to that level
are the first prefix reaching it, and its seconds are its sampling seconds per kept draw
times those draws (the peer's per-draw seconds include its unrestricted run, which its
estimator needs; the figure without it is reported too).

    python -m benchmarks.reliability_vs_devinterp [--quick] [--draws N] [--out DIR]
                                                  [--heads L0H0,L1H0] [--threads N]

Writes ``DIR/results.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from bayes_susc import LocalPosterior, get_group, sample
from bayes_susc.checks.until import Target, diagnose_entries, draws_needed
from bayes_susc.demo.model import next_token_loss
from benchmarks.vs_devinterp import FULL, BenchConfig, make_problem, peer_draws, run_peer


def _our_kernels() -> dict[str, tuple[str, dict[str, float]]]:
    """Our kernels: the demo's (the setting the demo-heads study names), and the peer's
    SGLD."""
    from bayes_susc.demo.preset import DemoSettings

    demo = DemoSettings()
    return {
        demo.kernel: (demo.kernel, {"step_size": demo.step_size, **dict(demo.kernel_options)}),
        "sgld": ("sgld", {"step_size": 1e-3}),
    }


MAX_LEVEL = 0.95


def _as_run(phi: np.ndarray, delta: np.ndarray) -> xr.DataTree:
    """Arrays (chain, draw) and (chain, draw, probe) as a run ``diagnose_entries`` reads:
    eval_loss = 0, so probe_loss − eval_loss = delta."""
    posterior = xr.Dataset(
        {
            "phi": (("chain", "draw"), phi),
            "eval_loss": (("chain", "draw"), np.zeros_like(phi)),
            "probe_loss": (("chain", "draw", "probe"), delta),
        }
    )
    return xr.DataTree.from_dict({"posterior": posterior})


def reliability_curve(
    runs: dict[str, tuple[np.ndarray, np.ndarray]], prefixes: list[int], target: Target
) -> list[float]:
    """Share of all (probe, head) entries passing ``target`` using the first n draws
    per chain, for each n in ``prefixes``; ``runs``: head -> (phi, delta)."""
    shares = []
    for n in prefixes:
        passing = [
            diagnose_entries(_as_run(phi[:, :n], delta[:, :n]), target)["passing"]
            for phi, delta in runs.values()
        ]
        shares.append(float(np.concatenate(passing).mean()))
    return shares


def _ours(problem: Any, cfg: BenchConfig, kernel: str, options: dict) -> dict[str, Any]:
    runs, start = {}, time.perf_counter()
    for comp in problem.components:
        post = LocalPosterior(
            problem.model,
            next_token_loss,
            problem.train_batches,
            comp,
            nbeta=cfg.nbeta,
            gamma=cfg.gamma,
        )
        data = sample(
            post,
            kernel,
            eval_data=problem.eval_tokens,
            probe_data=problem.probe_tokens,
            num_chains=cfg.num_chains,
            num_draws=cfg.num_draws,
            seed=cfg.seed,
            progress=False,
            **options,
        )
        p = get_group(data, "posterior")
        phi = p["phi"].values.astype(float)
        delta = p["probe_loss"].transpose("chain", "draw", "probe").values.astype(float)
        runs[comp.name] = (phi, delta - p["eval_loss"].values.astype(float)[..., None])
    return {"seconds": time.perf_counter() - start, "runs": runs}


def extrapolated_draws(
    runs: dict[str, tuple[np.ndarray, np.ndarray]], target: Target, level: float
) -> int | None:
    """Draws per chain at which ``level`` of each head's entries would pass, scaled from
    all the draws a side has (:func:`bayes_susc.checks.until.draws_needed`: ESS ∝ draws,
    R-hat − 1 ∝ 1/draws); the most any head needs. An estimate, not a measurement."""
    rule = dataclasses.replace(target, fraction=level)
    needs = []
    for phi, delta in runs.values():
        need = draws_needed(diagnose_entries(_as_run(phi, delta), rule), phi.shape[1], rule)
        if need is None:
            return None
        needs.append(need)
    return max(needs)


def _first_reaching(curve: list[float], prefixes: list[int], level: float) -> int | None:
    for n, share in zip(prefixes, curve):
        if share >= level:
            return n
    return None


def run(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """Both sides, their reliability curves and the seconds to a common level."""
    out.mkdir(parents=True, exist_ok=True)
    problem = make_problem(cfg, out)
    next_token_loss(problem.model, problem.eval_tokens).mean().backward()  # warm-up
    problem.model.zero_grad(set_to_none=True)
    target = Target()
    step = 25 if cfg.num_draws >= 100 else 5
    prefixes = list(range(step, cfg.num_draws + 1, step))
    sides: dict[str, dict[str, Any]] = {}
    for name, (kernel, options) in _our_kernels().items():
        res = _ours(problem, cfg, kernel, options)
        sides[f"bayes_susc {name}"] = {
            "seconds": res["seconds"],
            "seconds_per_draw": res["seconds"] / cfg.num_draws,
            "curve": reliability_curve(res["runs"], prefixes, target),
            "extrapolated_draws_to_max_level": extrapolated_draws(res["runs"], target, MAX_LEVEL),
        }
        print(f"  bayes_susc {name}: {res['seconds']:.1f} s", flush=True)
    peer = run_peer(problem, cfg, out / "peer_samples")
    got = peer_draws(problem, peer)
    peer_runs = {k: (v["phi"], v["delta_loss"]) for k, v in got["runs"].items()}
    heads_share = len(problem.components) / (len(problem.components) + 1)
    sides["devinterp sgld"] = {
        "seconds": peer["seconds"],
        "seconds_per_draw": peer["seconds"] / cfg.num_draws,
        # Its unrestricted run is one of its len(heads) + 1 restrictions, of about the
        # same cost as a head's (measured: 32 s against 26-28 s per head at 50 draws).
        "seconds_per_draw_heads_only": peer["seconds"] * heads_share / cfg.num_draws,
        "curve": reliability_curve(peer_runs, prefixes, target),
        "extrapolated_draws_to_max_level": extrapolated_draws(peer_runs, target, MAX_LEVEL),
    }
    print(f"  devinterp: {peer['seconds']:.1f} s", flush=True)
    level = min(MAX_LEVEL, *(max(s["curve"]) for s in sides.values()))
    for s in sides.values():
        s["draws_to_level"] = _first_reaching(s["curve"], prefixes, level)
        s["seconds_to_level"] = (
            None if s["draws_to_level"] is None else s["seconds_per_draw"] * s["draws_to_level"]
        )
    for s in sides.values():
        # Where a side falls short of MAX_LEVEL within its draws, the draws it would
        # need, scaled from its last diagnosis, give an estimated time to that level.
        n = _first_reaching(s["curve"], prefixes, MAX_LEVEL) or s["extrapolated_draws_to_max_level"]
        s["seconds_to_max_level"] = None if n is None else s["seconds_per_draw"] * n
        s["max_level_measured"] = _first_reaching(s["curve"], prefixes, MAX_LEVEL) is not None
    peer_side = sides["devinterp sgld"]
    ratios = {
        name: peer_side["seconds_to_level"] / s["seconds_to_level"]
        for name, s in sides.items()
        if name != "devinterp sgld" and s["seconds_to_level"] and peer_side["seconds_to_level"]
    }
    ratios_max = {
        name: peer_side["seconds_to_max_level"] / s["seconds_to_max_level"]
        for name, s in sides.items()
        if name != "devinterp sgld"
        and s["seconds_to_max_level"]
        and peer_side["seconds_to_max_level"]
    }
    results = {
        "benchmark": "reliability_vs_devinterp",
        "config": dataclasses.asdict(cfg),
        "heads": [c.name for c in problem.components],
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "prefixes": prefixes,
        "level": level,
        "sides": sides,
        "time_to_level_ratio": ratios,
        "max_level": MAX_LEVEL,
        "time_to_max_level_ratio": ratios_max,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 heads, 60 draws (smoke test)")
    parser.add_argument("--draws", type=int, default=400, help="kept draws per chain")
    parser.add_argument("--heads", default="L0H0,L1H0", help="comma-separated head names")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_reliability"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.draws < 25:
        parser.error(f"--draws must be >= 25, got {args.draws}")
    try:
        import devinterp  # noqa: F401
    except ImportError:
        sys.exit("devinterp is not installed: pip install -c constraints.txt -e '.[bench]'")
    torch.set_num_threads(args.threads)
    heads = tuple(h for h in args.heads.split(",") if h)
    cfg = dataclasses.replace(
        FULL,
        heads=heads,
        num_draws=60 if args.quick else args.draws,
        **({"train_steps": 150, "num_train_batches": 20} if args.quick else {}),
    )
    results = run(cfg, args.out)
    print(f"level: {100 * results['level']:.1f} % of entries passing")
    for name, s in results["sides"].items():
        to_level = s["seconds_to_level"]
        print(
            f"{name:18} {s['seconds']:8.1f} s for {cfg.num_draws} draws; to the level: "
            f"{s['draws_to_level']} draws, {'-' if to_level is None else f'{to_level:.1f}'} s"
        )
    for name, ratio in results["time_to_level_ratio"].items():
        print(f"time to the same reliability, devinterp / {name}: {ratio:.2f}x")
    for name, ratio in results["time_to_max_level_ratio"].items():
        print(
            f"time to {100 * MAX_LEVEL:.0f} % of entries passing (extrapolated where a side "
            f"falls short), devinterp / {name}: {ratio:.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
