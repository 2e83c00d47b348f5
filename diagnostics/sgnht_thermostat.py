"""SGNHT's thermostat: where it settles, how fast it gets there, what that does to the draws.

Run ``python -m diagnostics.sgnht_thermostat --out DIR [--quick] [--seed S]``.
Writes ``DIR/report.md``, ``DIR/thermostat_traces.png`` and ``DIR/results.json`` (every
figure of the report's tables, and the thermostat traces every ``TRACE_EVERY`` steps).

The thermostat ξ of SGNHT is SGHMC's friction made adaptive. Without gradient noise its
fixed point is set by the injected noise A (``diffusion``); a minibatch gradient with
per-coordinate noise variance b̄ (mean over coordinates of the variance of ∇Û_B across
batches) adds ε²b̄ to the momentum's noise per step, and moves the fixed point to
ξ* = A + ε·b̄/2. That excess is what the thermostat exists to absorb. The study
measures it, and the behaviour of four kernels that share the update
p ← (1 − εξ)p − ε∇Û + √(2Aε)η:

- ``sgnht``: the kernel as shipped (start A, target (1 − εξ/2)·pᵀp/d = 1, relaxation
  r = 20, i.e. ξ relaxes in about r/(εA) steps);
- ``ding_fast``: Ding et al.'s target pᵀp/d = 1 with the same fast gain — where the
  original rule's ξ *wants* to be;
- ``ding_old``: the previous default, Ding's target with Q = 1 (ξ ← ξ + ε(pᵀp/d − 1)),
  which relaxes in about ξ*/ε steps (10⁵ at the defaults);
- ``sghmc``: friction fixed at α = A.

Targets, all at ε = 1e-3, A = 100 unless stated:

1. *injected*: U = ½Σλ_a δ_a² (d = 20, λ from 1e3 to 4e3) with ∇U + √b·ζ, ζ ~ N(0, I)
   fresh each step, εb/2 = A, at ε = 2e-3, A = 50 (the setting of
   ``tests/test_sgnht.py``, run 2.4× longer with twice the chains): the noise is known, so
   the fixed point and both kernels' laws are closed forms.
2. *linear–Gaussian, nβ = 30*: ``LinearGaussianProblem.make(n=200, p=6)`` (all six
   weights free), γ = 300, minibatches of 20 items visited once per epoch in a seeded
   order, as the driver does: the literature's nβ and γ.
3. *linear–Gaussian, nβ = 3000*: the same data at 100× the nβ, where ε·b̄/2 is
   comparable to A; once with the epoch order and once with every step's batch drawn
   independently (with replacement), the setting Ding et al.'s argument assumes.
4. *demo heads*: L1H0 and L0H0 of the shipped demo transformer (4,144 weights each),
   nβ = 30, γ = 300, its 16 minibatches of 16 windows: the setting of the demo (L0H0,
   3× slower per step, runs ``sgnht`` only, for fewer steps).

Figures: b̄ at w* (and, for the heads, at the last draw of chain 0); ξ's start, its
settled value (mean over chains and over the last half of the steps, ± the sd of the
chain mean over those steps), both relative to A; steps to settle (the first step at
which ξ has covered 1 − 1/e of the way from its start to its settled value, when that
way is longer than 3 sd; otherwise "at start"); and on targets 1–3 the position
variances against the exact posterior Σ: the mean over coordinates of Var̂(δ_a)/Σ_aa
(exact: 1) with its ESS-aware Monte Carlo error, its range over coordinates, and
tr(K·Ĉ)/d (also 1 exactly; K = Σ⁻¹), the quantity the thermostat's target pins on a
quadratic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq

from bayes_susc.checks.ground_truth import LinearGaussianProblem, sghmc_stationary_cov
from bayes_susc.estimation.convergence import mcse_mean
from bayes_susc.kernels import SGHMC, SGNHT, NoiseSource
from bayes_susc.kernels.base import GradFn, GradientResult, gradient_info
from bayes_susc.kernels.diffusions import underdamped_momentum
from bayes_susc.kernels.sgnht import SGNHTState
from bayes_susc.sampling.driver import chain_seeds
from bayes_susc.target.components import Component
from bayes_susc.target.posterior import LocalPosterior
from diagnostics._report import md_table, study_main

EPS, A = 1e-3, 100.0
INJ_EPS, INJ_A, INJ_DIM = 2e-3, 50.0, 20
INJ_LAM = np.geomspace(1e3, 4e3, INJ_DIM)
LG_BATCH = 20
TRACE_EVERY = 20
KERNELS = ("sgnht", "ding_fast", "ding_old", "sghmc")
COLORS = {"sgnht": "C0", "ding_fast": "C1", "ding_old": "C2"}


class DingSGNHT(SGNHT):
    """Ding et al.'s thermostat target, pᵀp/d = 1, with the gain ε·A²/r (r = A² is the
    original rule ξ ← ξ + ε(pᵀp/d − 1)): the previous ``sgnht`` and its fast variant."""

    def step(
        self, state: SGNHTState, grad_fn: GradFn, noise: NoiseSource
    ) -> tuple[SGNHTState, dict[str, torch.Tensor]]:
        eps, xi = self.step_size, state.thermostat
        position = state.position + eps * state.momentum
        res = grad_fn(position)
        eta = noise.normal(position.shape[-1])
        momentum = underdamped_momentum(state.momentum, res.grad, eps, xi, self.diffusion, eta)
        kinetic = (momentum * momentum).mean(-1, keepdim=True)
        thermostat = xi + self.thermostat_gain * (kinetic - 1.0)
        info = gradient_info(res)
        info["thermostat"] = thermostat.squeeze(-1)
        return SGNHTState(position, momentum, thermostat), info


def make(kernel: str, eps: float, a: float):
    """One of :data:`KERNELS` at step ``eps`` and diffusion (or friction) ``a``."""
    if kernel == "sgnht":
        return SGNHT(step_size=eps, diffusion=a)
    if kernel == "ding_fast":
        return DingSGNHT(step_size=eps, diffusion=a)
    if kernel == "ding_old":
        return DingSGNHT(step_size=eps, diffusion=a, thermostat_relaxation=a * a)
    if kernel == "sghmc":
        return SGHMC(step_size=eps, friction=a)
    raise ValueError(f"unknown kernel {kernel!r}")


# --------------------------------------------------------------------------- targets
def lg_posterior(problem: LinearGaussianProblem, batch_size: int) -> LocalPosterior:
    """The problem as a float64 ``Linear`` model at w*, its training set cut into
    minibatches of ``batch_size`` items, the free coordinates as a mask component."""
    p = problem.X_train.shape[1]
    model = torch.nn.Linear(p, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.w_star)[None])
    mask = torch.zeros(1, p, dtype=torch.bool)
    mask[0, torch.as_tensor(problem.free.copy())] = True

    def squared_error(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return 0.5 * (m(x).squeeze(-1) - y) ** 2

    X, y = torch.tensor(problem.X_train), torch.tensor(problem.y_train)
    batches = list(zip(X.split(batch_size), y.split(batch_size)))
    return LocalPosterior(
        model,
        squared_error,
        batches,
        Component("S", {"weight": mask}),
        nbeta=problem.nbeta,
        gamma=problem.gamma,
    )


def demo_head_posterior(head: str) -> LocalPosterior:
    """A demo head's local posterior with the demo's minibatches, nβ = 30, γ = 300."""
    import tempfile

    from bayes_susc.demo.model import head_components, next_token_loss
    from bayes_susc.demo.preset import DemoSettings, demo_data, trained_demo_model

    s = DemoSettings()
    with tempfile.TemporaryDirectory(prefix="sgnht_study_") as folder:
        model = trained_demo_model(Path(folder), s)  # loaded into memory: the copy can go
    component = {c.name: c for c in head_components(model)}[head]
    return LocalPosterior(
        model,
        next_token_loss,
        demo_data(s)["train_batches"],
        component,
        nbeta=s.nbeta,
        gamma=s.gamma,
    )


def gradient_noise(posterior: LocalPosterior, position: torch.Tensor | None = None) -> np.ndarray:
    """Per coordinate, the variance over the training batches of ∇Û_B at ``position``
    (default w*): the covariance diagonal of the gradient noise of a uniformly drawn batch."""
    v = (posterior.anchor_vector if position is None else position)[None]
    grads = torch.stack(
        [posterior.potential_and_grad(v, b).grad[0] for b in posterior.train_batches]
    )
    return grads.double().var(0, unbiased=False).cpu().numpy()


def minibatch_gradients(
    posterior: LocalPosterior, steps: int, seed: int, order: str = "epoch"
) -> Callable[[int], GradFn]:
    """Step t's gradient on a minibatch: ``"epoch"`` visits each batch once per epoch in a
    seeded order (as :func:`bayes_susc.sample` does); ``"iid"`` draws every step's batch
    uniformly and independently (with replacement), so the gradient errors of successive
    steps are independent."""
    n = len(posterior.train_batches)
    rng = np.random.default_rng([seed, 0x5E])
    if order == "epoch":
        schedule = np.concatenate([rng.permutation(n) for _ in range(-(-steps // n))])
    elif order == "iid":
        schedule = rng.integers(0, n, steps)
    else:
        raise ValueError(f"order must be 'epoch' or 'iid', got {order!r}")

    def grad_for(t: int) -> GradFn:
        batch = posterior.train_batches[schedule[t]]
        return lambda positions: posterior.potential_and_grad(positions, batch)

    return grad_for


def injected_gradients(noise_var: float, seed: int) -> Callable[[int], GradFn]:
    """∇U + √b·ζ on the injected target's quadratic, ζ fresh at every call."""
    lam = torch.tensor(INJ_LAM, dtype=torch.float64)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def grad_fn(v: torch.Tensor) -> GradientResult:
        zeta = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        potential = 0.5 * (lam * v * v).sum(-1)
        return GradientResult(potential, lam * v + noise_var**0.5 * zeta, potential)

    return lambda t: grad_fn


# --------------------------------------------------------------------------- driving
def drive(
    kernel,
    grad_for: Callable[[int], GradFn],
    start: torch.Tensor,
    steps: int,
    burnin: int,
    thin: int,
    seed: int,
) -> dict[str, Any]:
    """Run ``kernel`` from ``start`` (chains, d) for ``steps`` steps.

    Returns the chain-mean ξ at every step (``xi``, absent for SGHMC), ξ per chain
    at every step (``xi_chains``), δ = v − start at every ``thin``-th step after
    ``burnin`` (``draws``, (chain, draw, d); none when ``thin`` is 0), the last
    position and the wall time."""
    chains = start.shape[0]
    noise = NoiseSource(chain_seeds(seed, chains), start.device, start.dtype)
    t0 = time.perf_counter()
    state = kernel.init(start.clone(), grad_for(0), noise)
    xi, draws = [], []
    for t in range(steps):
        state, info = kernel.step(state, grad_for(t), noise)
        if "thermostat" in info:
            xi.append(info["thermostat"].detach().double().cpu())
        if thin and t >= burnin and (t - burnin) % thin == 0:
            draws.append((state.position - start).detach().double().cpu())
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0, "last": state.position.detach()}
    if xi:
        xi_chains = torch.stack(xi).numpy()  # (steps, chains)
        out["xi_chains"], out["xi"] = xi_chains, xi_chains.mean(1)
    if draws:
        out["draws"] = torch.stack(draws, 1).numpy()
    return out


def settle_summary(xi: np.ndarray, start: float, a: float) -> dict[str, Any]:
    """ξ's start, settled value (mean over the last half), the sd of the chain mean over
    that half, and the steps to cover 1 − 1/e of the way (None when the way is shorter
    than 3 sd: ξ started where it settles). Values relative to A."""
    half = xi[len(xi) // 2 :]
    settled, sd = float(half.mean()), float(half.std())
    way = settled - start
    steps = None
    if abs(way) > 3 * sd:
        covered = (xi - start) / way
        hit = np.nonzero(covered >= 1 - np.exp(-1))[0]
        steps = int(hit[0]) + 1 if len(hit) else None
    return {
        "start_over_A": start / a,
        "settled_over_A": settled / a,
        "settled_sd_over_A": sd / a,
        "steps_to_settle": steps,
        "trace_over_A": np.round(xi[::TRACE_EVERY] / a, 5).tolist(),  # 5 decimals: plot only
    }


def variance_errors(draws: np.ndarray, cov: np.ndarray) -> dict[str, Any]:
    """Position variances of δ draws (chain, draw, d) against the exact covariance."""
    diag = np.diag(cov)
    ratio = draws**2 / diag  # the exact mean of δ is 0
    series = ratio.mean(-1)
    precision = np.linalg.inv(cov)
    config = np.einsum("cta,ab,ctb->ct", draws, precision, draws) / cov.shape[0]
    per_coord = ratio.mean((0, 1))
    return {
        "var_ratio": float(series.mean()),
        "var_ratio_se": float(mcse_mean(series)),
        "var_ratio_min": float(per_coord.min()),
        "var_ratio_max": float(per_coord.max()),
        "per_coordinate": per_coord.tolist(),
        "tr_KC_over_d": float(config.mean()),
        "tr_KC_over_d_se": float(mcse_mean(config)),
    }


# --------------------------------------------------------------------------- predictions
def frozen_law(lam: np.ndarray, eps: float, friction: float, temperature: float):
    """Per eigenvalue (λ·Var δ, Var p) of the underdamped recursion with fixed friction
    and momentum noise 2·temperature·ε (SGHMC's law scaled by temperature/friction)."""
    cov = np.array(
        [sghmc_stationary_cov(np.array([[x]]), eps, friction, full=True) for x in lam]
    ) * (temperature / friction)
    return cov[:, 0, 0] * lam, cov[:, 1, 1]


def thermostat_fixed_point(
    lam: np.ndarray, eps: float, temperature: float, ding: bool = False
) -> float:
    """ξ̄ with the thermostat's expected update zero at frozen ξ: mean (1 − εξ/2)·Var p
    = 1 (Ding's target: mean Var p = 1)."""

    def drift(xi: float) -> float:
        factor = 1.0 if ding else 1.0 - 0.5 * eps * xi
        return factor * frozen_law(lam, eps, xi, temperature)[1].mean() - 1.0

    return float(brentq(drift, 0.5 * temperature, 2.5 * temperature))


# --------------------------------------------------------------------------- the study
def run_injected(quick: bool, seed: int) -> dict[str, Any]:
    chains, burnin, kept = (8, 1000, 3000) if quick else (16, 2000, 22000)
    noise_var = 2 * INJ_A / INJ_EPS
    temperature = INJ_A + 0.5 * INJ_EPS * noise_var
    xi_bar = thermostat_fixed_point(INJ_LAM, INJ_EPS, temperature)
    xi_ding = thermostat_fixed_point(INJ_LAM, INJ_EPS, temperature, ding=True)
    out: dict[str, Any] = {
        "eps": INJ_EPS,
        "A": INJ_A,
        "dim": INJ_DIM,
        "chains": chains,
        "burnin": burnin,
        "kept": kept,
        "b": noise_var,
        "excess_over_A": 0.5 * INJ_EPS * noise_var / INJ_A,
        "predicted": {
            "sgnht_xi_over_A": xi_bar / INJ_A,
            "ding_xi_over_A": xi_ding / INJ_A,
            "sgnht_var_ratio": float(frozen_law(INJ_LAM, INJ_EPS, xi_bar, temperature)[0].mean()),
            "ding_var_ratio": float(frozen_law(INJ_LAM, INJ_EPS, xi_ding, temperature)[0].mean()),
            "sghmc_var_ratio": float(frozen_law(INJ_LAM, INJ_EPS, INJ_A, temperature)[0].mean()),
            "relaxation_steps": 20.0 * xi_bar / (INJ_EPS * INJ_A**2),
        },
        "runs": {},
    }
    cov = np.diag(1.0 / INJ_LAM)
    start = torch.zeros(chains, INJ_DIM, dtype=torch.float64)
    for k, name in enumerate(KERNELS):
        res = drive(
            make(name, INJ_EPS, INJ_A),
            injected_gradients(noise_var, seed + k),
            start,
            burnin + kept,
            burnin,
            5,
            seed + k,
        )
        run = {"seconds": res["seconds"], **variance_errors(res["draws"], cov)}
        if "xi" in res:
            run["xi"] = settle_summary(res["xi"], INJ_A, INJ_A)
        out["runs"][name] = run
    return out


def run_linear_gaussian(
    nbeta: float, order: str, kernels: tuple[str, ...], kept: int, quick: bool, seed: int
) -> dict[str, Any]:
    chains, burnin, kept = (8, 500, 2000) if quick else (32, 2000, kept)
    problem = LinearGaussianProblem.make(n=200, p=6, nbeta=nbeta, gamma=300.0, seed=seed)
    posterior = lg_posterior(problem, LG_BATCH)
    b = gradient_noise(posterior)
    lam = np.linalg.eigvalsh(problem.K)
    xi_bar = thermostat_fixed_point(lam, EPS, A + 0.5 * EPS * float(b.mean()))
    out: dict[str, Any] = {
        "nbeta": nbeta,
        "gamma": 300.0,
        "batch_size": LG_BATCH,
        "order": order,
        "batches": len(posterior.train_batches),
        "chains": chains,
        "burnin": burnin,
        "kept": kept,
        "lambda": lam.tolist(),
        "b_mean": float(b.mean()),
        "b_per_coordinate": b.tolist(),
        "excess_over_A": 0.5 * EPS * float(b.mean()) / A,
        "predicted": {
            "sgnht_xi_over_A": xi_bar / A,
            "ding_xi_over_A": thermostat_fixed_point(
                lam, EPS, A + 0.5 * EPS * float(b.mean()), ding=True
            )
            / A,
            # Per coordinate a (ignoring the off-diagonal K and noise): temperature
            # (A + εb_a/2)/friction, friction A for SGHMC and ξ̄ for SGNHT.
            "sghmc_var_ratio": ((A + 0.5 * EPS * b) / A).tolist(),
            "sgnht_var_ratio": ((A + 0.5 * EPS * b) / xi_bar).tolist(),
        },
        "runs": {},
    }
    start = posterior.anchor_vector.expand(chains, -1).clone()
    for k, name in enumerate(kernels):
        res = drive(
            make(name, EPS, A),
            minibatch_gradients(posterior, burnin + kept, seed + k, order),
            start,
            burnin + kept,
            burnin,
            10,
            seed + k,
        )
        run = {"seconds": res["seconds"], **variance_errors(res["draws"], problem.posterior_cov)}
        if "xi" in res:
            run["xi"] = settle_summary(res["xi"], A, A)
        out["runs"][name] = run
    return out


def run_head(head: str, kernels: tuple[str, ...], steps: int, quick: bool, seed: int):
    """``kernels`` on a demo head for ``steps`` steps (4 chains): b̄ and ξ's trace."""
    chains, steps = (2, 300) if quick else (4, steps)
    posterior = demo_head_posterior(head)
    b0 = gradient_noise(posterior)
    out: dict[str, Any] = {
        "head": head,
        "dim": posterior.dim,
        "nbeta": posterior.nbeta,
        "gamma": posterior.gamma,
        "batches": len(posterior.train_batches),
        "chains": chains,
        "steps": steps,
        "b_mean_at_w_star": float(b0.mean()),
        "b_max_at_w_star": float(b0.max()),
        "excess_over_A": 0.5 * EPS * float(b0.mean()) / A,
        "runs": {},
    }
    start = posterior.anchor_vector.expand(chains, -1).clone()
    for k, name in enumerate(kernels):
        res = drive(
            make(name, EPS, A),
            minibatch_gradients(posterior, steps, seed + k),
            start,
            steps,
            steps,
            0,
            seed + k,
        )
        run = {"seconds": res["seconds"], "xi": settle_summary(res["xi"], A, A)}
        if name == "sgnht":
            b1 = gradient_noise(posterior, res["last"][0])
            run["b_mean_at_last_draw"] = float(b1.mean())
            run["distance_at_last_draw"] = float((res["last"][0] - posterior.anchor_vector).norm())
        out["runs"][name] = run
    return out


def run_study(quick: bool, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # tiny tensors; the study shares a small machine
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "config": {"quick": quick, "seed": seed, "eps": EPS, "A": A, "relaxation": 20.0},
        "injected": run_injected(quick, seed),
        "lg_nbeta30": run_linear_gaussian(30.0, "epoch", KERNELS, 12000, quick, seed),
        "lg_nbeta3000": run_linear_gaussian(
            3000.0, "epoch", ("sgnht", "ding_old", "sghmc"), 8000, quick, seed
        ),
        "lg_nbeta3000_iid": run_linear_gaussian(
            3000.0, "iid", ("sgnht", "sghmc"), 8000, quick, seed
        ),
        "heads": [
            run_head("L1H0", ("sgnht", "ding_fast"), 1500, quick, seed),
            run_head("L0H0", ("sgnht",), 1000, quick, seed),
        ],
    }
    results["runtime_s"] = time.perf_counter() - t0
    return results


# --------------------------------------------------------------------------- output
def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("injected (εb/2 = A)", results["injected"]),
        ("linear–Gaussian nβ = 30", results["lg_nbeta30"]),
        ("linear–Gaussian nβ = 3000", results["lg_nbeta3000"]),
        ("nβ = 3000, independent batches", results["lg_nbeta3000_iid"]),
        *[(f"demo head {h['head']}", h) for h in results["heads"]],
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (title, block) in zip(axes[0], panels):
        for name, run in block["runs"].items():
            if "xi" in run:
                y = np.array(run["xi"]["trace_over_A"])
                ax.plot(np.arange(len(y)) * TRACE_EVERY, y, lw=0.8, label=name, color=COLORS[name])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_xscale("symlog", linthresh=100)
    axes[0][0].set_ylabel("ξ / A (mean over chains)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "thermostat_traces.png", dpi=80)
    plt.close(fig)


def _xi_cells(run: dict[str, Any]) -> list[Any]:
    if "xi" not in run:
        return ["—", "—", "—"]
    x = run["xi"]
    steps = "at start" if x["steps_to_settle"] is None else str(x["steps_to_settle"])
    return [
        f"{x['start_over_A']:.3f}",
        f"{x['settled_over_A']:.4f} ± {x['settled_sd_over_A']:.4f}",
        steps,
    ]


def _var_cells(run: dict[str, Any]) -> list[Any]:
    return [
        f"{run['var_ratio']:.3f} ± {run['var_ratio_se']:.3f}",
        f"{run['var_ratio_min']:.2f} – {run['var_ratio_max']:.2f}",
        f"{run['tr_KC_over_d']:.3f} ± {run['tr_KC_over_d_se']:.3f}",
    ]


def _block_table(block: dict[str, Any]) -> str:
    header = ["kernel", "ξ start/A", "ξ settled/A", "steps to settle", "Var̂/Σ (mean)",
              "Var̂/Σ range", "tr(KĈ)/d", "s"]  # fmt: skip
    rows = [
        [name, *_xi_cells(run), *_var_cells(run), f"{run['seconds']:.0f}"]
        for name, run in block["runs"].items()
    ]
    return md_table(header, rows)


def _ratio(run: dict[str, Any]) -> str:
    return f"{run['var_ratio']:.3f} ± {run['var_ratio_se']:.3f}"


def _verdict(results: dict[str, Any]) -> list[str]:
    inj, lg30 = results["injected"], results["lg_nbeta30"]
    ep, iid = results["lg_nbeta3000"], results["lg_nbeta3000_iid"]
    heads = results["heads"]
    pi, p30, p3k = inj["predicted"], lg30["predicted"], iid["predicted"]
    with_ding = [h for h in heads if "ding_fast" in h["runs"]]
    new_settled = [h["runs"]["sgnht"]["xi"] for h in heads]
    dip = min(min(x["trace_over_A"]) for x in new_settled)
    crossings = [
        run["xi"]["steps_to_settle"]
        for block in (inj, ep, iid, *with_ding)
        for name, run in block["runs"].items()
        if name in ("sgnht", "ding_fast") and run["xi"]["steps_to_settle"] is not None
    ]
    lines = [
        "- **Where ξ settles on real targets at the defaults (ε = 1e-3, A = 100).** The "
        "gradient-noise excess ε·b̄/(2A) is "
        + ", ".join(f"{h['excess_over_A']:.1e} on demo head {h['head']}" for h in heads)
        + f" and {lg30['excess_over_A']:.1e} on the linear–Gaussian model at nβ = 30 (b̄ at "
        "w*; at the heads' last draws b̄ is ≤ 3× larger). The shipped thermostat settled at "
        + ", ".join(
            f"{x['settled_over_A']:.4f}·A ± {x['settled_sd_over_A']:.4f} ({h['head']})"
            for x, h in zip(new_settled, heads)
        )
        + f" and {lg30['runs']['sgnht']['xi']['settled_over_A']:.3f}·A ± "
        f"{lg30['runs']['sgnht']['xi']['settled_sd_over_A']:.3f} (linear–Gaussian), after a "
        f"dip to {dip:.3f}·A in the first few hundred steps while the positions, started at "
        "w*, take up their share of the energy. So ξ's start, A, is its measured settle "
        "value. Ding et al.'s target settled at "
        + ", ".join(f"{h['runs']['ding_fast']['xi']['settled_over_A']:.4f}·A" for h in with_ding)
        + f" (head) and {lg30['runs']['ding_fast']['xi']['settled_over_A']:.3f}·A "
        f"(linear–Gaussian), predicted {p30['ding_xi_over_A']:.3f}·A: that excess is "
        "discretisation, not gradient noise.",
        "- **Old vs new defaults, linear–Gaussian nβ = 30** (variance ratio to the exact "
        f"posterior, 1): new {_ratio(lg30['runs']['sgnht'])}, old "
        f"{_ratio(lg30['runs']['ding_old'])}, SGHMC {_ratio(lg30['runs']['sghmc'])}, Ding's "
        f"target with the fast gain {_ratio(lg30['runs']['ding_fast'])}. The old ξ stayed "
        f"at {lg30['runs']['ding_old']['xi']['settled_over_A']:.3f}·A, so the old kernel "
        "was SGHMC with α = A; had it settled it would have run cold by ≈ εA/2 like "
        "`ding_fast`. At these settings there is no gradient noise to absorb and SGNHT "
        "and SGHMC sample the same law.",
        "- **Independent gradient errors: SGNHT absorbs them, SGHMC runs hot.** Injected "
        f"isotropic noise with εb/2 = A: SGNHT {_ratio(inj['runs']['sgnht'])}, ξ settled at "
        f"{inj['runs']['sgnht']['xi']['settled_over_A']:.3f}·A (predicted "
        f"{pi['sgnht_xi_over_A']:.3f}·A); SGHMC at α = A {_ratio(inj['runs']['sghmc'])} "
        f"(predicted {pi['sghmc_var_ratio']:.3f}); the old default "
        f"{_ratio(inj['runs']['ding_old'])} with ξ still climbing "
        f"({inj['runs']['ding_old']['xi']['settled_over_A']:.2f}·A over the second half of "
        f"{inj['burnin'] + inj['kept']} steps). Linear–Gaussian nβ = 3000 with batches drawn "
        f"independently (ε·b̄/2 = {iid['excess_over_A']:.2f}·A): SGNHT "
        f"{_ratio(iid['runs']['sgnht'])}, ξ {iid['runs']['sgnht']['xi']['settled_over_A']:.3f}·A "
        f"(predicted {p3k['sgnht_xi_over_A']:.3f}·A); SGHMC {_ratio(iid['runs']['sghmc'])}. "
        "One scalar ξ corrects the mean temperature only: with b_a spanning "
        f"{min(iid['b_per_coordinate']):.2g} – {max(iid['b_per_coordinate']):.2g}, SGNHT's "
        f"per-coordinate ratios span {iid['runs']['sgnht']['var_ratio_min']:.2f} – "
        f"{iid['runs']['sgnht']['var_ratio_max']:.2f} (predicted "
        f"{min(p3k['sgnht_var_ratio']):.2f} – {max(p3k['sgnht_var_ratio']):.2f}).",
        "- **Epoch-ordered batches (what `bayes_susc.sample` does) with large noise: SGNHT "
        f"over-corrects.** Same target, each batch once per epoch: SGNHT "
        f"{_ratio(ep['runs']['sgnht'])} (ξ {ep['runs']['sgnht']['xi']['settled_over_A']:.3f}·A),"
        f" SGHMC {_ratio(ep['runs']['sghmc'])}, old default {_ratio(ep['runs']['ding_old'])}. "
        "The gradient errors of one epoch sum to zero: the momentum, which forgets in "
        "≈ 1/(εξ) = 10 steps, still feels them, but the positions, which average over "
        "hundreds of steps, barely do (SGHMC's excess falls from "
        f"{iid['runs']['sghmc']['var_ratio'] - 1:.2f} to "
        f"{ep['runs']['sghmc']['var_ratio'] - 1:.2f}), so the kinetic temperature the "
        "thermostat reads overstates the heating of the positions. Where ε·b̄/2 is not "
        "small against A, SGNHT is right only with independently drawn batches; with "
        "the epoch order prefer `sghmc` there.",
        "- **Relaxation.** With r = 20 the linearised time constant is r·ξ*/(εA²) steps "
        f"(200 at ξ* = A, {pi['relaxation_steps']:.0f} on the injected target); ξ covered "
        f"1 − 1/e of its way in {min(crossings)} – {max(crossings)} steps on every target "
        "where it had a way to go. The old default (Q = 1) needs ≈ ξ*/ε steps (10⁵ at the "
        "defaults): on the injected target its ξ was at "
        f"{inj['runs']['ding_old']['xi']['trace_over_A'][-1]:.2f}·A after "
        f"{inj['burnin'] + inj['kept']} steps, against a fixed point of "
        f"{pi['ding_xi_over_A']:.2f}·A.",
    ]
    return lines


def report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    inj, heads = results["injected"], results["heads"]
    pi = inj["predicted"]
    lines = [
        "# SGNHT's thermostat: start, settle point, relaxation",
        "",
        f"{'Quick run' if cfg['quick'] else 'Full run'}, seed {cfg['seed']}, "
        f"{results['runtime_s']:.0f} s (one thread, shared machine). Generated by "
        "`python -m diagnostics.sgnht_thermostat`; every number below is in `results.json`.",
        "",
        "## Verdict",
        "",
        *_verdict(results),
        "",
        "## Method",
        "",
        __doc__.split("\n\n", 2)[2].split("\n\nFigures:", 1)[0],
        "",
        "Figures:" + __doc__.split("\n\nFigures:", 1)[1].rstrip(),
        "",
        f"## 1. Injected isotropic gradient noise (ε = {inj['eps']:g}, A = {inj['A']:g}, "
        f"d = {inj['dim']}, {inj['chains']} chains, {inj['burnin']} + {inj['kept']} steps)",
        "",
        f"b = {inj['b']:.3g} (εb/2 = {inj['excess_over_A']:.2f}·A). Predicted (frozen-ξ "
        f"Lyapunov laws): ξ̄ = {pi['sgnht_xi_over_A']:.4f}·A with variance ratio "
        f"{pi['sgnht_var_ratio']:.4f}; Ding's target ξ̄ = {pi['ding_xi_over_A']:.4f}·A, "
        f"ratio {pi['ding_var_ratio']:.4f}; SGHMC ratio {pi['sghmc_var_ratio']:.4f}.",
        "",
        _block_table(inj),
        "",
    ]
    blocks = (
        ("2. Linear–Gaussian, nβ = 30, epoch order", results["lg_nbeta30"]),
        ("3a. Linear–Gaussian, nβ = 3000, epoch order", results["lg_nbeta3000"]),
        ("3b. Linear–Gaussian, nβ = 3000, independent batches", results["lg_nbeta3000_iid"]),
    )
    for title, block in blocks:
        p = block["predicted"]
        lines += [
            f"## {title} (γ = {block['gamma']:g}, {block['batches']} batches of "
            f"{block['batch_size']}, {block['chains']} chains, {block['burnin']} + "
            f"{block['kept']} steps)",
            "",
            f"λ(K) = {', '.join(f'{x:.0f}' for x in block['lambda'])}; b̄ at w* = "
            f"{block['b_mean']:.3g} (ε·b̄/2 = {block['excess_over_A']:.2e}·A), b_a = "
            f"{', '.join(f'{x:.3g}' for x in block['b_per_coordinate'])}. Prediction for "
            f"independent errors: ξ̄ = {p['sgnht_xi_over_A']:.4f}·A (Ding's target "
            f"{p['ding_xi_over_A']:.4f}·A); per-coordinate variance ratios "
            "(A + εb_a/2)/friction: SGHMC "
            f"{', '.join(f'{x:.2f}' for x in p['sghmc_var_ratio'])}, SGNHT "
            f"{', '.join(f'{x:.2f}' for x in p['sgnht_var_ratio'])}.",
            "",
            _block_table(block),
            "",
            "Measured per-coordinate ratios: "
            + "; ".join(
                f"{n} " + ", ".join(f"{x:.2f}" for x in r["per_coordinate"])
                for n, r in block["runs"].items()
            )
            + ".",
            "",
        ]
    lines += [
        "## 4. Demo heads (nβ = 30, γ = 300, 16 batches of 16 windows, ε = 1e-3, A = 100)",
        "",
    ]
    header = ["head", "d", "b̄ at w*", "ε·b̄/(2A)", "kernel", "chains × steps", "ξ start/A",
              "ξ settled/A", "steps to settle", "s"]  # fmt: skip
    rows = []
    for h in heads:
        for name, run in h["runs"].items():
            rows.append(
                [h["head"], h["dim"], f"{h['b_mean_at_w_star']:.3g}",
                 f"{h['excess_over_A']:.1e}", name, f"{h['chains']} × {h['steps']}",
                 *_xi_cells(run), f"{run['seconds']:.0f}"]
            )  # fmt: skip
    lines += [
        md_table(header, rows),
        "",
        "b̄ at the last draw of chain 0 (sgnht): "
        + ", ".join(
            f"{h['head']} {h['runs']['sgnht']['b_mean_at_last_draw']:.3g} (‖v − v*‖ = "
            f"{h['runs']['sgnht']['distance_at_last_draw']:.2f})"
            for h in heads
        )
        + ". The two heads' ξ traces agree to the fourth digit: both use the same seeds, "
        "and the thermostat reads pᵀp/d over 4,144 coordinates whose dynamics at γ = 300 "
        "are dominated by the injected noise and the prior, not by the head's loss.",
        "",
        "![thermostat traces](thermostat_traces.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return study_main("sgnht_thermostat", __doc__, run_study, plots, report, argv)


if __name__ == "__main__":
    main()
