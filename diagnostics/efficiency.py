"""Sampling efficiency: ESS of χ entries per gradient evaluation and per second, per kernel.

Run ``python -m diagnostics.efficiency --out DIR [--quick] [--seed S]``.
Writes ``DIR/report.md``, ``DIR/efficiency.png`` and ``DIR/results.json`` (every figure
of the report's tables).

Two targets: the linear–Gaussian model of ``diagnostics.kernels_exact`` (|S| = 5,
nβ = 30, γ = 10, full batch, step h = 0.7 for overdamped and 0.45 for underdamped
kernels, as in that study's grid) and the tanh MLP of ``diagnostics.kernels_nuts``
(128 first-layer weights, nβ = 300, γ = 10, minibatches of 64, that study's
hyperparameters). Every kernel runs ``CHAINS`` chains with the same burn-in and kept
steps; NUTS (``sample_nuts``, full batch) runs beside them on the MLP.

ESS of a χ entry = ESS_bulk of its product series (``bayes_susc.estimate``); the
figure is the median over probe entries, summed over chains (the estimate pools
them). Per gradient evaluation: divided by chains × kept steps (one gradient per step
for every SG kernel and for MALA; a minibatch gradient counts as one even though it
touches 1/4 of the data); for NUTS, by the gradient evaluations Pyro made, counted by
wrapping the potential (warm-up included, since NUTS's adaptation is part of its
cost). Per second: divided by the wall time of the whole ``sample`` call (burn-in and
observables included), single thread, on a shared machine: ratios between kernels are
meaningful, absolute figures are not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_susc import sample
from bayes_susc.checks.ground_truth import torch_local_posterior
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.sampling.exact import sample_nuts
from diagnostics import kernels_exact, kernels_nuts
from diagnostics._report import md_table, study_main

KERNELS = ("sgld", "psgld", "sghmc", "sgnht", "mala")
CHAINS = 16


def _lg_runs(kernels, draws: int, spd: int, burnin: int, seed: int) -> dict[str, Any]:
    pr = kernels_exact.make_problem(*kernels_exact.SWEEP_TARGET)
    post, ev, pb = torch_local_posterior(pr)
    out = {}
    for k in kernels:
        h = kernels_exact.GRID_STEP["under" if k in kernels_exact.UNDERDAMPED else "over"]
        hyper, _, _ = kernels_exact.kernel_setup(k, pr, h)
        t0 = time.perf_counter()
        idata = sample(post, k, eval_data=ev, probe_data=pb, num_chains=CHAINS, num_draws=draws,
                       num_burnin=burnin, steps_per_draw=spd, seed=seed, progress=False,
                       **hyper)  # fmt: skip
        secs = time.perf_counter() - t0
        out[k] = _summary(idata, CHAINS * draws * spd, secs, hyper)
        print(f"linear-Gaussian {k}: {secs:.1f} s", flush=True)
    return out


def _summary(idata, grads: int, secs: float, hyper: dict[str, Any]) -> dict[str, Any]:
    ess = float(np.median(estimate(idata)["ess_bulk"].values))
    return {
        "median_ess_bulk": ess,
        "gradient_evaluations": int(grads),
        "seconds": secs,
        "ess_per_1000_grads": 1000.0 * ess / grads,
        "ess_per_second": ess / secs,
        "hyperparameters": hyper,
    }


def _mlp_runs(kernels, draws: int, spd: int, burnin: int, nuts_cfg, seed: int) -> dict[str, Any]:
    prob = kernels_nuts.make_mlp_problem(seed)
    out = {}
    for k in kernels:
        t0 = time.perf_counter()
        idata = kernels_nuts.run_kernel(k, prob, CHAINS, draws, spd, burnin, seed)
        secs = time.perf_counter() - t0
        hyper = kernels_nuts.kernel_hyper(k, prob)
        out[k] = _summary(idata, CHAINS * draws * spd, secs, hyper)
        print(f"MLP {k}: {secs:.1f} s", flush=True)
    if nuts_cfg is not None:
        post = prob["full"]
        calls = [0]
        potential = post.potential_fn

        def counted(params):
            calls[0] += 1
            return potential(params)

        post.potential_fn = counted  # instance attribute: counts Pyro's evaluations
        try:
            t0 = time.perf_counter()
            idata = sample_nuts(post, eval_data=prob["eval"], probe_data=prob["probe"],
                                seed=seed, **nuts_cfg)  # fmt: skip
            secs = time.perf_counter() - t0
        finally:
            del post.potential_fn
        # sample_nuts evaluates the potential once per kept draw for its statistics.
        grads = calls[0] - nuts_cfg["num_chains"] * nuts_cfg["num_draws"]
        out["nuts"] = _summary(idata, grads, secs, dict(nuts_cfg))
        print(f"MLP nuts: {secs:.1f} s", flush=True)
    return out


def run_study(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if quick:
        lg_k, mlp_k = ("sgld", "mala"), ("sgld",)
        lg_cfg, mlp_cfg = (100, 5, 200), (100, 5, 200)
        nuts_cfg = {"num_chains": 1, "num_draws": 100, "num_warmup": 50}
    else:
        lg_k = mlp_k = KERNELS
        lg_cfg, mlp_cfg = (400, 10, 1000), (400, 10, 2000)
        nuts_cfg = {"num_chains": 2, "num_draws": 400, "num_warmup": 200}
    lg = _lg_runs(lg_k, *lg_cfg, seed)
    mlp = _mlp_runs(mlp_k, *mlp_cfg, nuts_cfg, seed)
    return {
        "config": {
            "quick": quick,
            "seed": seed,
            "chains": CHAINS,
            "linear_gaussian": dict(zip(("draws", "steps_per_draw", "burnin"), lg_cfg)),
            "mlp": dict(zip(("draws", "steps_per_draw", "burnin"), mlp_cfg)),
            "nuts": nuts_cfg,
        },
        "linear_gaussian": lg,
        "mlp": mlp,
        "runtime_s": time.perf_counter() - t_start,
    }


def _plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key in zip(axes, ("ess_per_1000_grads", "ess_per_second")):
        targets = ("linear_gaussian", "mlp")
        names = list(dict.fromkeys(k for t in targets for k in results[t]))
        x = np.arange(len(names))
        for i, t in enumerate(targets):
            y = [results[t][k][key] if k in results[t] else np.nan for k in names]
            ax.bar(x + (i - 0.5) * 0.38, y, width=0.38, label=t.replace("_", "–"))
        ax.set_xticks(x, names, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(key.replace("_", " "), fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Median ESS_bulk of χ entries, per gradient and per second", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=80)
    plt.close(fig)


def _report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "# Sampling efficiency of χ entries per kernel",
        "",
        f"{'Quick run' if cfg['quick'] else 'Full run'}, seed {cfg['seed']}, "
        f"{results['runtime_s']:.0f} s. Generated by `python -m diagnostics.efficiency`; "
        "every number below is in `results.json`.",
        "",
        "## Verdict",
        "",
    ]
    for t in ("linear_gaussian", "mlp"):
        res = results[t]
        best_g = max(res, key=lambda k: res[k]["ess_per_1000_grads"])
        best_s = max(res, key=lambda k: res[k]["ess_per_second"])
        lines.append(
            f"- {t.replace('_', '–')}: most ESS per gradient `{best_g}` "
            f"({res[best_g]['ess_per_1000_grads']:.2f} per 1000), per second `{best_s}` "
            f"({res[best_s]['ess_per_second']:.1f}/s). Efficiency says nothing about bias: "
            "read it with `kernels_exact` and `kernels_nuts`, and pick the cheapest kernel "
            "whose bias is acceptable there."
        )
    lines += ["", "## Method", "", __doc__.split("\n\n", 2)[2], ""]
    for t in ("linear_gaussian", "mlp"):
        c = cfg[t]
        lines += [
            f"## {t.replace('_', '–')} ({CHAINS} chains × {c['draws']} draws × thinning "
            f"{c['steps_per_draw']}, burn-in {c['burnin']})",
            "",
        ]
        rows = []
        for k, r in results[t].items():
            hp = ", ".join(f"{a}={b:.3g}" for a, b in r["hyperparameters"].items())
            rows.append([k, hp, f"{r['median_ess_bulk']:.0f}", r["gradient_evaluations"],
                         r["ess_per_1000_grads"], f"{r['seconds']:.1f}",
                         f"{r['ess_per_second']:.1f}"])  # fmt: skip
        lines += [
            md_table(
                [
                    "kernel",
                    "hyperparameters",
                    "median ESS",
                    "gradients",
                    "ESS / 1000 grads",
                    "seconds",
                    "ESS / s",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    lines += ["![efficiency](efficiency.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return study_main("efficiency", __doc__, run_study, _plots, _report, argv)


if __name__ == "__main__":
    main()
