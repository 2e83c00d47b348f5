"""The stability check (issue 18): a step beyond the kernel's limit on a component's
stiffest curvature gives no "ok" entry, even when nothing diverges; a stable step passes.
The limits themselves are checked against the spectral radius of each kernel's linear
recursion on a quadratic."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bayes_susc.checks.stability import stability_limit
from bayes_susc.errors import StabilityWarning
from bayes_susc.kernels.base import make_kernel
from bayes_susc.pipeline.run import run
from bayes_susc.pipeline.spec import RunSpec, SamplingSettings
from bayes_susc.target.components import Component


def _stiff_tanh_mlp() -> nn.Module:
    """3 → 8 tanh → 1 with output weights 2; with inputs of scale 4 the first layer's
    24 weights have λmax ≈ 8.1e3 at nβ 30, γ 300, so ε·λmax ≈ 8 at ε = 1e-3."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        net[2].weight.fill_(2.0)
    return net


def squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-item squared error of a (inputs, targets) batch."""
    x, y = batch
    return ((model(x) - y) ** 2).squeeze(-1)


def _spec(step_size: float) -> RunSpec:
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 4.0 * torch.randn(n, 3, generator=g)
        return x, torch.tanh(x[:, :1])

    return RunSpec(
        name="stiff",
        model=_stiff_tanh_mlp(),
        model_description="tanh MLP",
        loss_fn=squared_error,
        train_data=[batch(64)],
        eval_data=batch(32),
        probe_data=batch(6),
        probe_coords={"dataset": ["probe"] * 6},
        components=(
            Component.from_parameters("layer0", ["0.weight"]),
            Component.from_parameters("layer1", ["2.weight"]),
        ),
        sampling=SamplingSettings(
            hyperparameters={"step_size": step_size},
            num_chains=2,
            num_draws=60,
            num_burnin=20,
        ),
    )


def test_unstable_step_gets_no_ok_entry_and_is_named(tmp_path):
    with pytest.warns(StabilityWarning, match="layer0: eps\\*lambda_max = 8.1"):
        summary = run(_spec(1e-3), tmp_path / "warned", report=False)
    said = []  # with a log, the same message goes there instead (the command line's way)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        summary = run(_spec(1e-3), tmp_path, report=False, log=said.append)
    check = json.loads((tmp_path / "stability.json").read_text())["layer0"]
    assert check["measure"] == "eps*lambda_max" and check["limit"] == 4.0
    assert 7.5 < check["value"] < 8.7 and not check["stable"]
    assert 1e-4 < check["suggested_step_size"] < 2e-4  # 1/λmax
    assert any("a stable step size is about 0.00012" in m for m in said), said
    import xarray as xr

    with xr.open_dataset(tmp_path / "response_matrix.nc", engine="netcdf4") as m:
        status = m["status"].load()
    # No divergence: tanh keeps the chains bounded. Only the stability check catches it.
    assert summary["components"]["layer0"]["diverged_chains"] == 0
    assert set(status.sel(component="layer0").values) == {"unstable"}
    assert "unstable" not in set(status.sel(component="layer1").values)
    assert summary["stability"]["layer1"]["stable"]


def test_stable_step_passes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        summary = run(_spec(1e-4), tmp_path, report=False)
    check = summary["stability"]["layer0"]
    assert check["stable"] and 0.75 < check["value"] < 0.87
    import xarray as xr

    with xr.open_dataset(tmp_path / "response_matrix.nc", engine="netcdf4") as m:
        assert "unstable" not in set(m["status"].values.ravel())
        assert "unstable" not in m
        llc, low, high = (m[k].load() for k in ("llc", "llc_low", "llc_high"))
    # Each component's restricted LLC is nβ·mean(φ) of its own draws, inside its interval.
    from bayes_susc.storage.draws import get_group, load

    for name in ("layer0", "layer1"):
        phi = get_group(load(tmp_path / "components" / f"{name}.nc"), "posterior")["phi"]
        value = float(llc.sel(component=name))
        assert value == pytest.approx(30.0 * phi.values.astype(float).mean(), rel=1e-12)
        assert float(low.sel(component=name)) < value < float(high.sel(component=name))


@pytest.mark.parametrize("name", ["sghmc", "sgnht"])
def test_underdamped_limit_is_the_spectral_radius_boundary(name):
    """On U = λδ²/2 the update (δ, p) → (δ + εp, (1 − εa)p − ελ(δ + εp)) is stable iff its
    spectral radius is < 1; the stated limit ε²λ < 4 − 2εa must sit exactly there."""
    eps, a = 1e-2, 30.0
    kernel = make_kernel(name, step_size=eps, **{"friction" if name == "sghmc" else "diffusion": a})
    boundary = (4.0 - 2.0 * eps * a) / eps**2
    for lam, stable in ((0.99 * boundary, True), (1.01 * boundary, False)):
        m = np.array([[1.0, eps], [-eps * lam, 1.0 - eps * a - eps * eps * lam]])
        radius = np.abs(np.linalg.eigvals(m)).max()
        measure, value, limit, _ = stability_limit(kernel, lam)
        assert measure == "eps^2*lambda_max"
        assert bool(radius < 1.0) is stable and bool(value < limit) is stable


def test_sgld_limit_and_kernels_without_one():
    eps = 1e-3
    for lam, stable in ((3.99 / eps, True), (4.01 / eps, False)):
        # SGLD on U = λδ²/2: δ' = (1 − ελ/2)δ + √ε ξ, stable iff |1 − ελ/2| < 1.
        assert (abs(1 - eps * lam / 2) < 1) is stable
        _, value, limit, _ = stability_limit(make_kernel("sgld", step_size=eps), lam)
        assert (value < limit) is stable
    assert stability_limit(make_kernel("mala"), 1e6) is None
    assert stability_limit(make_kernel("psgld"), 1e6) is None


def _linear_posterior(scale: float):
    from bayes_susc.target.posterior import LocalPosterior

    g = torch.Generator().manual_seed(3)
    x = scale * torch.randn(40, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64))
    y = model(x).detach()

    def loss(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).squeeze(-1)

    comp = Component.from_parameters("w", ["weight"])
    return LocalPosterior(model, loss, [(x, y)], comp, nbeta=30.0, gamma=300.0), x


@pytest.mark.parametrize(("scale", "dominated"), [(0.1, True), (10.0, False)])
def test_prior_and_data_dominated_linear_components(scale, dominated):
    """Squared error of a linear model: H_L = 2XᵀX/n, so tr(nβH_L) is known exactly; the
    bound tr/γ on the data-dominated directions decides the verdict."""
    from bayes_susc.checks.stability import check_prior_dominance

    posterior, x = _linear_posterior(scale)
    got = check_prior_dominance(posterior)
    exact = 30.0 * 2.0 * float(torch.trace(x.T @ x)) / x.shape[0]
    assert got.data_trace == pytest.approx(exact, rel=1e-10)
    assert got.data_directions_bound == pytest.approx(exact / 300.0, rel=1e-10)
    assert got.prior_dominated is dominated and got.dim == 3


def test_hutchinson_trace_agrees_with_the_exact_one():
    from bayes_susc.checks.stability import check_prior_dominance

    posterior, _ = _linear_posterior(1.0)
    exact = check_prior_dominance(posterior).data_trace
    estimate = check_prior_dominance(posterior, probes=2, seed=5).data_trace  # 2 < d = 3
    # Rademacher probes on a 3x3 Hessian: unbiased, off-diagonal terms add the error.
    assert estimate == pytest.approx(exact, rel=0.5) and estimate != exact


def _numpy_langevin_acceptance(lam: float, eps: float, dim: int, chains: int, rng) -> float:
    """MALA's acceptance of SGLD moves on U = λ‖v‖²/2, from v = 0: 20 unscored moves,
    then 30 scored ones (the check's schedule), written out independently."""
    v = np.zeros((chains, dim))
    scored = []
    for t in range(50):
        proposal = v - 0.5 * eps * lam * v + np.sqrt(eps) * rng.standard_normal(v.shape)
        forward = ((proposal - v + 0.5 * eps * lam * v) ** 2).sum(1) / (2 * eps)
        backward = ((v - proposal + 0.5 * eps * lam * proposal) ** 2).sum(1) / (2 * eps)
        log_r = 0.5 * lam * ((v**2).sum(1) - (proposal**2).sum(1)) - backward + forward
        if t >= 20:
            scored.append(np.exp(np.minimum(log_r, 0.0)))
        v = proposal
    return float(np.mean(scored))


@pytest.mark.parametrize("step_lam", [0.3, 3.0])
def test_langevin_acceptance_agrees_with_an_independent_simulation(step_lam):
    """A component of 400 weights whose loss is flat (zero inputs): U = γ‖v − v*‖²/2
    exactly, every direction at ε·γ = step_lam. The check's 2 chains × 30 moves agree
    with a 400-chain numpy simulation of the same schedule within 0.08 (the check's own
    MC error is about 0.02; the acceptance falls from ≈ 0.78 to ≈ 0.51 between the two
    steps, so swapping the forward and backward terms or dropping the drift fails)."""
    from bayes_susc.checks.stability import check_langevin_acceptance
    from bayes_susc.target.posterior import LocalPosterior

    dim, gamma = 400, 300.0
    model = nn.Linear(dim, 1, bias=False).double()
    x = torch.zeros(8, dim, dtype=torch.float64)
    y = torch.zeros(8, 1, dtype=torch.float64)
    comp = Component.from_parameters("w", ["weight"])
    posterior = LocalPosterior(model, squared_error, [(x, y)], comp, nbeta=30.0, gamma=gamma)
    eps = step_lam / gamma
    got = check_langevin_acceptance(posterior, make_kernel("sgld", step_size=eps), seed=2)
    expected = _numpy_langevin_acceptance(gamma, eps, dim, 400, np.random.default_rng(0))
    assert got.scored and got.moves == 30 and got.chains == 2
    assert got.value == pytest.approx(expected, abs=0.08)
    assert got.passed  # a stable step on a Gaussian stays above the floor
    other = check_langevin_acceptance(posterior, make_kernel("sghmc", step_size=1e-3))
    assert not other.scored and other.passed and np.isnan(other.value)


def test_low_acceptance_reaches_the_status(tmp_path, monkeypatch):
    """The pipeline records each component's acceptance in stability.json and its entries
    get 'low_acceptance' when it is below the floor (here the floor is raised above any
    acceptance, to show the wiring on a stable step)."""
    from bayes_susc.checks import stability

    monkeypatch.setattr(stability, "ACCEPTANCE_FLOOR", 0.999)
    with pytest.warns(StabilityWarning, match="below 0.999"):
        summary = run(_spec(1e-4), tmp_path, report=False)
    record = json.loads((tmp_path / "stability.json").read_text())["layer1"]
    assert record["stable"] and record["acceptance"]["scored"]
    assert 0.4 < record["acceptance"]["value"] < 0.999 and not record["acceptance"]["passed"]
    assert summary["stability"]["layer1"]["acceptance"]["floor"] == 0.999
    import xarray as xr

    with xr.open_dataset(tmp_path / "response_matrix.nc", engine="netcdf4") as m:
        assert set(m["status"].values.ravel()) == {"low_acceptance"}
        assert bool(m["low_acceptance"].all())


def test_a_negative_trace_bounds_no_directions():
    """Away from a minimum the loss Hessian's trace can be negative (here the loss is
    minus a squared error, so tr(nβH_L) = −2nβ·tr(XᵀX)/n exactly): the trace is kept as
    measured, the count of data-dominated directions is 0, and the verdict follows."""
    from bayes_susc.checks.stability import check_prior_dominance
    from bayes_susc.target.posterior import LocalPosterior

    posterior, x = _linear_posterior(1.0)

    def concave(m, batch):
        return -((m(batch[0]) - batch[1]) ** 2).squeeze(-1)

    flipped = LocalPosterior(
        posterior.model,
        concave,
        posterior.train_batches,
        posterior.component,
        nbeta=30.0,
        gamma=300.0,
    )
    got = check_prior_dominance(flipped)
    exact = -30.0 * 2.0 * float(torch.trace(x.T @ x)) / x.shape[0]
    assert got.data_trace == pytest.approx(exact, rel=1e-10) and exact < 0
    assert got.data_directions_bound == 0.0 and got.prior_dominated
