"""Kernels vs NUTS: χ of every kernel on a small nonlinear network against Pyro's NUTS.

Run ``python -m diagnostics.kernels_nuts --out DIR [--quick] [--seed S]``.
Writes ``DIR/report.md``, ``DIR/scatter.png`` and ``DIR/results.json`` (every figure of
the report's tables).

Model (:func:`make_mlp_problem`): a tanh MLP 8→16→1 (161 weights) trained with Adam on
synthetic regression data (y = Σ_k tanh(x·w_k) over 3 hidden directions + 0.3·noise,
256 training items, squared loss). Component: the first-layer weight (128 entries;
biases and the second layer frozen). Evaluation set E: 100 fresh items; probes: 20
fresh items. nβ = 300, γ = 10: the data term nβ·H of the Hessian at w* reaches
λmax ≈ 10²–10³ ≫ γ in its top directions, so the posterior there is set by the
likelihood, not by the Gaussian prior (at the literature defaults nβ = 30, γ = 300 the
prior dominates every direction and NUTS would compare kernels on a Gaussian). The
report gives the Hessian's spectrum and how many of its eigenvalues exceed 2γ.

Reference: ``bayes_susc.sampling.exact.sample_nuts`` (Pyro NUTS, full batch, adaptive step and
diagonal mass matrix). SG kernels use minibatches of 64 (4 per epoch) and a step
scaled to the Hessian's λmax (h = ε·λmax for SGLD, ε·√λmax for SGHMC/SGNHT with
friction/diffusion √λmax; adaptive pSGLD with α = 0.999 and ε chosen so that
ε·Ḡ·λmax ≈ h, Ḡ ≈ 1/√(mean diag H)); MALA is full batch at ε·λmax = 1. All chains start
at w*. χ and its 95% interval come from ``bayes_susc.estimate`` (default ``ess_t``).

Per kernel, over the 20 probes: the fraction whose difference from NUTS lies within
the combined half-width √(hw_SG² + hw_NUTS²) (≈ 0.95 if both are unbiased), the
median |Δχ| / |χ_NUTS|, the median |Δχ| relative to the median |χ_NUTS| (stable when
some χ are near 0), and the Pearson correlation of SG χ with NUTS χ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_susc import sample
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.sampling.exact import sample_nuts
from bayes_susc.target.components import Component
from bayes_susc.target.posterior import LocalPosterior
from diagnostics._report import md_table, study_main

NBETA = 300.0
GAMMA = 10.0
N_TRAIN = 256
BATCH = 64
KERNELS = ("sgld", "psgld", "sghmc", "sgnht", "mala")
H_OVER = 0.1
H_UNDER = 0.2
H_MALA = 1.0


def _loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    X, y = batch
    return 0.5 * (y - m(X).squeeze(-1)) ** 2


def make_mlp_problem(seed: int = 0) -> dict[str, Any]:
    """The trained MLP's local posteriors (minibatch and full batch), E, probes, spectrum."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N_TRAIN + 120, 8, dtype=torch.float64, generator=gen)
    W = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    y = torch.tanh(X @ W).sum(-1) + 0.3 * torch.randn(len(X), dtype=torch.float64, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    Xt, yt = X[:N_TRAIN], y[:N_TRAIN]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(600):
        opt.zero_grad()
        _loss(model, (Xt, yt)).mean().backward()
        opt.step()
    comp = Component("layer0.weight", {"0.weight": None})
    batches = [(Xt[i : i + BATCH], yt[i : i + BATCH]) for i in range(0, N_TRAIN, BATCH)]
    mini = LocalPosterior(model, _loss, batches, comp, nbeta=NBETA, gamma=GAMMA)
    full = LocalPosterior(model, _loss, [(Xt, yt)], comp, nbeta=NBETA, gamma=GAMMA)

    def pot(v: torch.Tensor) -> torch.Tensor:
        return full.potential_fn({"v": v})

    hess = torch.autograd.functional.hessian(pot, full.anchor_vector).detach()
    lam = torch.linalg.eigvalsh(hess).numpy()
    return {
        "mini": mini,
        "full": full,
        "eval": (X[N_TRAIN : N_TRAIN + 100], y[N_TRAIN : N_TRAIN + 100]),
        "probe": (X[N_TRAIN + 100 :], y[N_TRAIN + 100 :]),
        "lambda": lam,
        "hess_diag_mean": float(torch.diagonal(hess).mean()),
        "train_loss": float(_loss(model, (Xt, yt)).mean().detach()),
        "dim": int(full.anchor_vector.numel()),
    }


def kernel_hyper(kernel: str, prob: dict[str, Any]) -> dict[str, float]:
    lmax = float(prob["lambda"][-1])
    if kernel == "sgld":
        return {"step_size": H_OVER / lmax}
    if kernel == "psgld":
        g_bar = 1.0 / np.sqrt(prob["hess_diag_mean"])
        return {"step_size": H_OVER / (g_bar * lmax), "alpha": 0.999}
    if kernel == "sghmc":
        return {"step_size": H_UNDER / np.sqrt(lmax), "friction": float(np.sqrt(lmax))}
    if kernel == "sgnht":
        return {"step_size": H_UNDER / np.sqrt(lmax), "diffusion": float(np.sqrt(lmax))}
    if kernel == "mala":
        return {"step_size": H_MALA / lmax}
    raise ValueError(f"unknown kernel {kernel!r}")


def run_kernel(
    kernel: str, prob: dict[str, Any], chains: int, draws: int, spd: int, burnin: int, seed: int
):
    post = prob["full"] if kernel == "mala" else prob["mini"]
    return sample(
        post,
        kernel,
        eval_data=prob["eval"],
        probe_data=prob["probe"],
        num_chains=chains,
        num_draws=draws,
        num_burnin=burnin,
        steps_per_draw=spd,
        seed=seed,
        progress=False,
        **kernel_hyper(kernel, prob),
    )


def compare(sg, ref) -> dict[str, Any]:
    """Agreement of one kernel's χ estimate (Dataset) with the NUTS estimate."""
    chi, ref_chi = sg["chi"].values, ref["chi"].values
    hw = 0.5 * (sg["ci_high"].values - sg["ci_low"].values)
    hw_ref = 0.5 * (ref["ci_high"].values - ref["ci_low"].values)
    diff = chi - ref_chi
    within = np.abs(diff) <= np.hypot(hw, hw_ref)
    return {
        "chi": chi,
        "ci_low": sg["ci_low"].values,
        "ci_high": sg["ci_high"].values,
        "frac_within": float(within.mean()),
        "median_rel_diff": float(np.median(np.abs(diff) / np.abs(ref_chi))),
        "median_abs_diff_over_median_abs_chi": float(
            np.median(np.abs(diff)) / np.median(np.abs(ref_chi))
        ),
        "corr": float(np.corrcoef(chi, ref_chi)[0, 1]),
        "median_z": float(np.median(np.abs(diff) / np.hypot(sg["se"].values, ref["se"].values))),
        "median_ess_bulk": float(np.median(sg["ess_bulk"].values)),
        "max_rhat": float(np.nanmax(sg["rhat"].values)),
    }


def run_study(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    prob = make_mlp_problem(seed)
    if quick:
        nuts_cfg = {"num_chains": 2, "num_draws": 150, "num_warmup": 100}
        sg_cfg = {"chains": 8, "draws": 100, "spd": 5, "burnin": 300}
        kernels: tuple[str, ...] = ("sgld", "mala")
    else:
        nuts_cfg = {"num_chains": 4, "num_draws": 500, "num_warmup": 300}
        sg_cfg = {"chains": 32, "draws": 400, "spd": 20, "burnin": 3000}
        kernels = KERNELS
    runtimes: dict[str, float] = {}
    t0 = time.perf_counter()
    nuts = sample_nuts(
        prob["full"], eval_data=prob["eval"], probe_data=prob["probe"], seed=seed, **nuts_cfg
    )
    runtimes["nuts"] = time.perf_counter() - t0
    ref = estimate(nuts)
    nuts_var = float(np.var(nuts.posterior["phi"].values))
    per_kernel: dict[str, Any] = {}
    for k in kernels:
        t0 = time.perf_counter()
        idata = run_kernel(k, prob, seed=seed + 1, **sg_cfg)
        runtimes[k] = time.perf_counter() - t0
        res = compare(estimate(idata), ref)
        res["hyperparameters"] = kernel_hyper(k, prob)
        res["diverged_chains"] = int(idata.posterior.attrs["num_diverged_chains"])
        if k == "mala":
            res["acceptance"] = float(np.nanmean(idata.sample_stats["acceptance_rate"].values))
        if k == "psgld":
            res["precond_mean"] = float(np.nanmean(idata.sample_stats["precond_mean"].values))
        per_kernel[k] = res
        print(f"{k}: within {res['frac_within']:.2f}, corr {res['corr']:.3f} "
              f"({runtimes[k]:.1f} s)", flush=True)  # fmt: skip
    lam = prob["lambda"]
    runtimes["total"] = time.perf_counter() - t_start
    return {
        "config": {
            "quick": quick,
            "seed": seed,
            "nbeta": NBETA,
            "gamma": GAMMA,
            "n_train": N_TRAIN,
            "batch_size": BATCH,
            "dim": prob["dim"],
            "num_probe": int(len(ref["chi"])),
            "nuts": nuts_cfg,
            "sg": sg_cfg,
        },
        "target": {
            "train_loss": prob["train_loss"],
            "lambda_min": float(lam[0]),
            "lambda_max": float(lam[-1]),
            "num_lambda_above_2gamma": int((lam > 2 * GAMMA).sum()),
            "nuts_phi_var": nuts_var,
            "nuts_divergences": int(nuts.posterior.attrs["num_divergent_transitions"]),
        },
        "nuts": {
            "chi": ref["chi"].values,
            "ci_low": ref["ci_low"].values,
            "ci_high": ref["ci_high"].values,
            "median_ess_bulk": float(np.median(ref["ess_bulk"].values)),
            "max_rhat": float(np.nanmax(ref["rhat"].values)),
        },
        "kernels": per_kernel,
        "runtimes_s": runtimes,
    }


def _plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(results["kernels"])
    ref = results["nuts"]
    x = np.asarray(ref["chi"], dtype=float)
    xerr = [x - np.asarray(ref["ci_low"]), np.asarray(ref["ci_high"]) - x]
    fig, axes = plt.subplots(1, len(ks), figsize=(2.8 * len(ks), 2.9), squeeze=False)
    for ax, k in zip(axes[0], ks):
        r = results["kernels"][k]
        y = np.asarray(r["chi"], dtype=float)
        yerr = [y - np.asarray(r["ci_low"]), np.asarray(r["ci_high"]) - y]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=3, elinewidth=0.6, capsize=1)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.6)
        ax.set_title(f"{k}: r = {r['corr']:.3f}", fontsize=8)
        ax.set_xlabel("χ NUTS", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("χ kernel", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=80)
    plt.close(fig)


def _report(results: dict[str, Any]) -> str:
    cfg, tg = results["config"], results["target"]
    ks = results["kernels"]
    lines = [
        "# Kernels vs NUTS (tanh MLP 8→16→1, first-layer weight)",
        "",
        f"{'Quick run' if cfg['quick'] else 'Full run'}, seed {cfg['seed']}, "
        f"{results['runtimes_s']['total']:.0f} s. Generated by "
        "`python -m diagnostics.kernels_nuts`; every number below is in `results.json`.",
        "",
        "## Verdict",
        "",
    ]
    for k, r in ks.items():
        good = r["frac_within"] >= 0.8 and r["corr"] >= 0.95
        lines.append(
            f"- **{k}**: {r['frac_within']:.0%} of {cfg['num_probe']} probe χ within the "
            f"combined interval of NUTS, correlation {r['corr']:.3f}, median relative "
            f"difference {r['median_rel_diff']:.2f} — "
            + (
                "agrees with NUTS."
                if good
                else "differs from NUTS: lower the step size "
                "(bias), or run longer if the intervals are wide."
            )  # fmt: skip
        )
    lines += [
        "",
        "## Method",
        "",
        __doc__.split("\n\n", 2)[2],
        "",
        "## Target",
        "",
        md_table(
            ["d", "nβ", "γ", "train loss", "λmin(H)", "λmax(H)", "#λ > 2γ", "NUTS divergences"],
            [
                [
                    cfg["dim"],
                    cfg["nbeta"],
                    cfg["gamma"],
                    tg["train_loss"],
                    tg["lambda_min"],
                    tg["lambda_max"],
                    tg["num_lambda_above_2gamma"],
                    tg["nuts_divergences"],
                ]
            ],
        ),  # fmt: skip
        "",
        f"NUTS: {cfg['nuts']['num_chains']} chains × {cfg['nuts']['num_draws']} draws "
        f"({cfg['nuts']['num_warmup']} warm-up), median ESS_bulk of χ entries "
        f"{results['nuts']['median_ess_bulk']:.0f}, max R-hat {results['nuts']['max_rhat']:.3f}. "
        f"SG kernels: {cfg['sg']['chains']} chains × {cfg['sg']['draws']} draws, thinning "
        f"{cfg['sg']['spd']}, burn-in {cfg['sg']['burnin']} steps.",
        "",
        "## Agreement with NUTS",
        "",
    ]
    rows = []
    for k, r in ks.items():
        hp = ", ".join(f"{a}={b:.3g}" for a, b in r["hyperparameters"].items())
        extra = ""
        if "acceptance" in r:
            extra = f"acc. {r['acceptance']:.2f}"
        if "precond_mean" in r:
            extra = f"Ḡ {r['precond_mean']:.3g}"
        rows.append([k, hp, r["frac_within"], r["median_rel_diff"],
                     r["median_abs_diff_over_median_abs_chi"], r["corr"], r["median_z"],
                     f"{r['median_ess_bulk']:.0f}", r["max_rhat"], r["diverged_chains"], extra,
                     f"{results['runtimes_s'][k]:.1f}"])  # fmt: skip
    lines += [
        md_table(
            [
                "kernel",
                "hyperparameters",
                "within CI",
                "median |Δ|/|χ|",
                "median |Δ| / med |χ|",
                "corr",
                "median |z|",
                "ESS",
                "max R-hat",
                "div.",
                "",
                "s",
            ],
            rows,
        ),  # fmt: skip
        "",
        "![scatter](scatter.png)",
        "",
        "## Runtimes (s)",
        "",
        md_table(["part", "seconds"], [[k, f"{v:.1f}"] for k, v in results["runtimes_s"].items()]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return study_main("kernels_nuts", __doc__, run_study, _plots, _report, argv)


if __name__ == "__main__":
    main()
