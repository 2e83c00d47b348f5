"""The sampling driver: frozen entries stay frozen, runs are reproducible, divergences are
flagged not dropped, bad input fails before sampling, user kernels plug in, and the
output (and its file) has the documented layout."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from importlib.metadata import version
from typing import Any, ClassVar, NamedTuple

import arviz
import numpy as np
import pytest
import torch
import xarray as xr
from arviz_reference import ARVIZ_MAJOR, BACKENDS

import bayes_susc
from bayes_susc import (
    Component,
    DivergenceWarning,
    LocalPosterior,
    get_group,
    load,
    register_kernel,
    sample,
    save,
)
from bayes_susc.demo.model import AttnOnlyConfig, AttnOnlyTransformer, next_token_loss
from bayes_susc.kernels import (
    SGLD,
    available_kernels,
    gradient_info,
    make_kernel,
    unregister_kernel,
)
from bayes_susc.sampling.driver import chain_seeds
from bayes_susc.storage.draws import (
    check_backend,
    default_backend,
    group_names,
    make_inference_data,
)

KERNELS = ["sgld", "psgld", "sghmc", "sgnht", "mala"]
TINY = AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, d_head=8, n_ctx=16)
WQ = "blocks.0.attn.W_Q"


# ------------------------------------------------------------------------ helpers
def _regression_data(n: int = 48, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5])[:d] + 0.3 * torch.randn(n, generator=g)
    return X, y


def sq_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, t = batch
    return 0.5 * (model(x).squeeze(-1) - t) ** 2


def _linear(seed: int = 0) -> tuple[torch.nn.Linear, dict[str, Any]]:
    """A least-squares-fitted Linear(3, 1) and its data (train, eval, probe batches)."""
    X, y = _regression_data(seed=seed)
    model = torch.nn.Linear(3, 1)
    A = torch.cat([X, torch.ones(len(X), 1)], dim=1)
    sol = torch.linalg.lstsq(A, y.unsqueeze(-1)).solution.squeeze(-1)
    with torch.no_grad():
        model.weight.copy_(sol[:3].unsqueeze(0))
        model.bias.copy_(sol[3:])
    data = {
        "train": [(X[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)],
        "eval": [(X[:24], y[:24]), (X[24:], y[24:])],
        "probe": [(X[:3], y[:3]), (X[3:7], y[3:7])],
    }
    return model, data


def _linear_posterior(component=("weight", "bias"), **kw):
    model, data = _linear()
    return model, LocalPosterior(model, sq_loss, data["train"], list(component), **kw), data


def _run(post, data, kernel="sgld", **kw):
    opts = dict(eval_data=data["eval"], probe_data=data["probe"], num_chains=2, num_draws=6)
    opts.update(kw)
    return sample(post, kernel, **opts)


def _tokens(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _param_clones(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_model_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None, n  # sampling never accumulates .grad on the model


class _State(NamedTuple):
    position: torch.Tensor
    t: torch.Tensor


class NaNInjector:
    """SGLD that sets chain ``bad_chain``'s position to NaN at step ``at_step``."""

    name: ClassVar[str] = "test_nan_injector"
    full_batch: ClassVar[bool] = False

    def __init__(self, step_size: float = 1e-3, bad_chain: int = 1, at_step: int = 5) -> None:
        self.step_size, self.bad_chain, self.at_step = step_size, bad_chain, at_step

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    def init(self, position, grad_fn, noise):
        return _State(position, torch.zeros(position.shape[0]))

    def step(self, state, grad_fn, noise):
        res = grad_fn(state.position)
        xi = noise.normal(state.position.shape[-1])
        pos = state.position - 0.5 * self.step_size * res.grad + self.step_size**0.5 * xi
        rows = torch.arange(pos.shape[0])
        inject = (state.t == self.at_step) & (rows == self.bad_chain)
        pos = torch.where(inject.unsqueeze(-1), torch.nan, pos)
        return _State(pos, state.t + 1), gradient_info(res)


class Boom:
    """A kernel that fails loudly if sampling ever starts."""

    name: ClassVar[str] = "boom"
    full_batch: ClassVar[bool] = False
    step_size = 1e-3

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    def init(self, position, grad_fn, noise):
        raise AssertionError("sampling started although the input was invalid")

    def step(self, state, grad_fn, noise):
        raise AssertionError("sampling started although the input was invalid")


class CountingSGLD(SGLD):
    """SGLD that counts its steps (to check that an error came before sampling)."""

    steps = 0

    def step(self, state, grad_fn, noise):
        self.steps += 1
        return super().step(state, grad_fn, noise)


@pytest.fixture
def registered():
    """Register kernels under test names; remove them again afterwards."""
    names: list[str] = []

    def reg(name: str, factory, **kw) -> str:
        register_kernel(name, factory, **kw)
        names.append(name)
        return name

    yield reg
    for name in names:
        if name in available_kernels():
            unregister_kernel(name)


# -------------------------------------------------------------- frozen parameters
def test_frozen_parameter_bit_identical_and_model_untouched():
    model, post, data = _linear_posterior(component=["weight"])
    before = _param_clones(model)
    idata = _run(
        post,
        data,
        num_chains=3,
        num_draws=8,
        observables={"bias": lambda m: m.bias.detach(), "weight": lambda m: m.weight},
    )
    _assert_model_untouched(model, before)
    p = get_group(idata, "posterior")
    bias = p["bias"].values  # (chain, draw, 1)
    assert np.array_equal(bias, np.broadcast_to(before["bias"].numpy(), bias.shape))
    weight = p["weight"].values
    assert not np.any(weight == before["weight"].numpy())  # the free weight did move


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_out_entries_stay_frozen(kernel):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    _, data = _linear()
    mask = torch.arange(18).reshape(6, 3) % 2 == 0
    post = LocalPosterior(model, sq_loss, data["train"], Component("half", {"0.weight": mask}))
    before = _param_clones(model)
    idata = _run(
        post,
        data,
        kernel,
        num_draws=5,
        step_size=1e-3 if kernel != "mala" else 1e-4,
        observables={"w0": lambda m: m[0].weight, "w2": lambda m: m[2].weight.detach()},
    )
    _assert_model_untouched(model, before)
    p = get_group(idata, "posterior")
    w0, m = p["w0"].values, mask.numpy()
    anchor = before["0.weight"].numpy()
    assert np.array_equal(w0[:, :, ~m], np.broadcast_to(anchor[~m], w0[:, :, ~m].shape))
    w2 = p["w2"].values
    assert np.array_equal(w2, np.broadcast_to(before["2.weight"].numpy(), w2.shape))
    # MALA may reject, so ask only that the free entries moved at some draw.
    assert np.any(w0[:, :, m] != anchor[m])


def test_index_selected_head_keeps_other_head_frozen():
    model = AttnOnlyTransformer(TINY, generator=0)
    tokens = _tokens(4, 12, seed=0)
    comp = Component("L0H0", {WQ: (0,), "blocks.0.attn.b_Q": (0,)})
    post = LocalPosterior(model, next_token_loss, [tokens[:2], tokens[2:]], comp)
    before = _param_clones(model)
    idata = sample(
        post,
        "sgld",
        eval_data=tokens,
        probe_data=tokens[:1],
        num_chains=2,
        num_draws=4,
        observables={
            "W_Q": lambda m: m.blocks[0].attn.W_Q,
            "W_K": lambda m: m.blocks[0].attn.W_K.detach(),
        },
    )
    _assert_model_untouched(model, before)
    p = get_group(idata, "posterior")
    wq, wk = p["W_Q"].values, p["W_K"].values  # (chain, draw, head, d_model, d_head)
    assert np.array_equal(wq[:, :, 1], np.broadcast_to(before[WQ][1].numpy(), wq[:, :, 1].shape))
    assert np.all(wq[:, :, 0] != before[WQ][0].numpy())
    assert np.array_equal(wk, np.broadcast_to(before["blocks.0.attn.W_K"].numpy(), wk.shape))


# ------------------------------------------------------------------- determinism
def _all_arrays(idata) -> dict[str, np.ndarray]:
    out = {}
    for g in ("posterior", "sample_stats"):
        ds = get_group(idata, g)
        out.update({f"{g}.{k}": ds[k].values for k in ds.data_vars})
    return out


@pytest.mark.parametrize("kernel", ["sgld", "sghmc"])
def test_same_seed_same_draws_different_seed_different(kernel):
    _, post, data = _linear_posterior()
    a = _all_arrays(_run(post, data, kernel, seed=7))
    b = _all_arrays(_run(post, data, kernel, seed=7))
    c = _all_arrays(_run(post, data, kernel, seed=8))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for k in (
        "posterior.phi",
        "posterior.probe_loss",
        "sample_stats.loss",
        "sample_stats.distance",
    ):
        assert not np.array_equal(a[k], c[k]), k
    # Chains of one run differ from each other.
    assert not np.array_equal(a["posterior.phi"][0], a["posterior.phi"][1])


@pytest.mark.parametrize("kernel", KERNELS)
def test_vectorized_matches_sequential(kernel):
    _, post, data = _linear_posterior()
    kw = dict(seed=3, num_chains=3, num_draws=6, num_burnin=2, steps_per_draw=2)
    vec = _all_arrays(_run(post, data, kernel, **kw))
    seq = _all_arrays(_run(post, data, kernel, chain_method="sequential", **kw))
    assert vec.keys() == seq.keys()
    for k in vec:
        np.testing.assert_allclose(seq[k], vec[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_vectorized_matches_sequential_transformer():
    model = AttnOnlyTransformer(TINY, generator=1)
    tokens = _tokens(4, 12, seed=1)
    post = LocalPosterior(
        model, next_token_loss, [tokens[:2], tokens[2:]], Component("L0H1", {WQ: (1,)})
    )
    kw = dict(eval_data=tokens, probe_data=tokens[:1], num_chains=2, num_draws=4, seed=5)
    vec = _all_arrays(sample(post, "sgld", **kw))
    seq = _all_arrays(sample(post, "sgld", chain_method="sequential", **kw))
    for k in vec:
        np.testing.assert_allclose(seq[k], vec[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_chain_draws_do_not_depend_on_number_of_chains():
    _, post, data = _linear_posterior()
    two = _all_arrays(_run(post, data, "sghmc", seed=11, num_chains=2))
    three = _all_arrays(_run(post, data, "sghmc", seed=11, num_chains=3))
    for k in two:
        np.testing.assert_allclose(three[k][:2], two[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert chain_seeds(11, 3)[:2] == chain_seeds(11, 2)
    assert len(set(chain_seeds(11, 8))) == 8


# -------------------------------------------------------------------- divergence
@pytest.mark.parametrize(
    ("num_burnin", "steps_per_draw", "first_bad_draw"),
    [(0, 1, 5), (2, 2, 1)],  # NaN at step 5; kept draws at steps 3, 5, 7, ... in the second
)
def test_one_chain_diverges(registered, num_burnin, steps_per_draw, first_bad_draw):
    registered("test_nan_injector", NaNInjector)
    _, post, data = _linear_posterior()
    num_draws = 8
    with pytest.warns(DivergenceWarning, match=re.escape("chain(s) [1]")) as rec:
        idata = _run(
            post,
            data,
            "test_nan_injector",
            num_chains=3,
            num_draws=num_draws,
            num_burnin=num_burnin,
            steps_per_draw=steps_per_draw,
            observables={"w": lambda m: m.weight.reshape(-1)},
        )
    assert "step(s) [5]" in str(rec[0].message) and "Lower step_size" in str(rec[0].message)
    p, s = get_group(idata, "posterior"), get_group(idata, "sample_stats")
    div = s["diverged"].values
    assert div.dtype == bool and div.shape == (3, num_draws)
    assert not div[1, :first_bad_draw].any() and div[1, first_bad_draw:].all()
    assert not div[[0, 2]].any()
    for name in ("phi", "eval_loss", "probe_loss", "w"):
        v = p[name].values
        assert np.isnan(v[1, first_bad_draw:]).all(), name
        assert np.isfinite(v[1, :first_bad_draw]).all(), name
        assert np.isfinite(v[[0, 2]]).all(), name
    for name in ("loss", "potential", "grad_norm", "distance"):
        v = s[name].values
        assert np.isnan(v[1, first_bad_draw:]).all() and np.isfinite(v[1, :first_bad_draw]).all()
        assert np.isfinite(v[[0, 2]]).all(), name
    for ds in (p, s):
        assert ds.attrs["num_diverged_chains"] == 1
        config = json.loads(ds.attrs["bayes_susc_config"])
        assert config["diverged_chains"] == [1]
        assert config["diverged_at_step"] == [-1, 5, -1]


def test_huge_step_size_diverges_every_chain():
    _, post, data = _linear_posterior()
    with pytest.warns(DivergenceWarning, match=re.escape("chain(s) [0, 1]")):
        idata = _run(post, data, "sgld", step_size=50.0, num_draws=30)
    s = get_group(idata, "sample_stats")
    assert s["diverged"].values[:, -1].all()
    # Once flagged, a chain stays flagged.
    div = s["diverged"].values
    assert np.all(np.diff(div.astype(int), axis=1) >= 0)
    p = get_group(idata, "posterior")
    assert np.isnan(p["phi"].values[:, -1]).all()
    assert s.attrs["num_diverged_chains"] == 2
    assert json.loads(s.attrs["bayes_susc_config"])["diverged_chains"] == [0, 1]


def test_no_warning_without_divergence():
    _, post, data = _linear_posterior()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        idata = _run(post, data)
    assert not get_group(idata, "sample_stats")["diverged"].values.any()
    assert get_group(idata, "posterior").attrs["num_diverged_chains"] == 0
    assert issubclass(DivergenceWarning, UserWarning)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("step_size", [0.0, -1e-3, math.nan, math.inf])
def test_step_size_must_be_positive_and_finite(kernel, step_size):
    _, post, data = _linear_posterior()
    with pytest.raises(ValueError, match="step_size must be"):
        _run(post, data, kernel, step_size=step_size)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"nbeta": 0.0}, ValueError, "nbeta must be > 0, got 0.0"),
        ({"nbeta": -3}, ValueError, "nbeta must be > 0, got -3.0"),
        ({"gamma": -1.0}, ValueError, "gamma must be >= 0, got -1.0"),
        ({"nbeta": math.nan}, ValueError, "nbeta must be finite"),
        ({"gamma": math.nan}, ValueError, "gamma must be finite"),
        ({"gamma": math.inf}, ValueError, "gamma must be finite"),
        ({"nbeta": "30"}, TypeError, "nbeta must be a real number"),
        ({"component": Component("c", {})}, ValueError, "component 'c' is empty"),
        ({"component": ["nope"]}, ValueError, "unknown parameter 'nope'"),
        (
            {"component": Component("c", {"weight": (0, slice(0, 99))})},
            ValueError,
            "slice 0:99 out of range for dim 1 of size 3",
        ),
        ({"component": "weight"}, TypeError, "component must be a Component"),
    ],
)
def test_bad_posterior_arguments(kwargs, exc, pattern):
    model, data = _linear()
    args = {"component": ["weight"], **kwargs}
    component = args.pop("component")
    with pytest.raises(exc, match=re.escape(pattern)):
        LocalPosterior(model, sq_loss, data["train"], component, **args)


def _scalar_loss(m, b):
    return sq_loss(m, b).mean()


def _transposed_loss(m, b):
    return sq_loss(m, b).reshape(1, -1)


def _float_loss(m, b):
    return float(sq_loss(m, b).sum())


def _nan_loss(m, b):
    return sq_loss(m, b) * torch.nan


@pytest.mark.parametrize(
    ("loss_fn", "exc", "pattern"),
    [
        (_scalar_loss, ValueError, "loss_fn returned a scalar"),
        (_transposed_loss, ValueError, "leading dimension must be the batch dimension"),
        (_float_loss, TypeError, "loss_fn must return a Tensor"),
        (_nan_loss, ValueError, "non-finite losses at w*"),
        ("not callable", TypeError, "loss_fn must be callable"),
    ],
)
def test_bad_loss_fn(loss_fn, exc, pattern):
    model, data = _linear()
    with pytest.raises(exc, match=re.escape(pattern)):
        LocalPosterior(model, loss_fn, data["train"], ["weight"])


def test_component_of_mixed_or_integer_dtypes():
    model, data = _linear()
    model.bias.data = model.bias.data.double()
    with pytest.raises(TypeError, match=r"component 'component' mixes dtypes \['torch.float32', "):
        LocalPosterior(model, sq_loss, data["train"], ["weight", "bias"])
    model.register_parameter("count", torch.nn.Parameter(torch.ones(2, dtype=torch.long), False))
    with pytest.raises(TypeError, match="free parameters must be floating point, got torch.int64"):
        LocalPosterior(model, sq_loss, data["train"], ["count"])


def test_train_batch_of_wrong_dtype():
    model, data = _linear()
    train = [(x.double(), t.double()) for x, t in data["train"]]
    with pytest.raises(TypeError, match=r"train_data: batch tensor has dtype torch.float64"):
        LocalPosterior(model, sq_loss, train, ["weight"])


def test_one_shot_generator_as_train_data():
    model, data = _linear()
    with pytest.raises(TypeError, match="train_data must be re-iterable"):
        LocalPosterior(model, sq_loss, (b for b in data["train"]), ["weight"])


def test_empty_train_data():
    model, _ = _linear()
    with pytest.raises(ValueError, match="train_data is empty"):
        LocalPosterior(model, sq_loss, [], ["weight"])


def _double(batches):
    return [(x.double(), t.double()) for x, t in batches]


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"num_chains": 0}, ValueError, "num_chains must be >= 1, got 0"),
        ({"num_draws": 0}, ValueError, "num_draws must be >= 1, got 0"),
        ({"num_draws": 2.5}, TypeError, "num_draws must be an int"),
        ({"num_burnin": -1}, ValueError, "num_burnin must be >= 0"),
        ({"steps_per_draw": 0}, ValueError, "steps_per_draw must be >= 1"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"chain_method": "parallel"}, ValueError, "chain_method must be 'vectorized' or"),
        ({"probe_data": []}, ValueError, "probe_data is empty"),
        ({"probe_data": None}, ValueError, "probe_data must be given"),
        ({"eval_data": []}, ValueError, "eval_data is empty"),
        ({"probe_data": "DOUBLE"}, TypeError, "probe_data: batch tensor has dtype torch.float64"),
        ({"eval_data": "DOUBLE"}, TypeError, "eval_data: batch tensor has dtype torch.float64"),
        ({"probe_coords": {"token": list("abcdef")}}, ValueError, "probe_coords['token']"),
        ({"probe_coords": {"probe": list("abcdefg")}}, ValueError, "may not be named 'probe'"),
        ({"observables": {"bad": lambda m: m.weight * torch.nan}}, ValueError, "'bad'"),
        ({"observables": {"bad": 3}}, TypeError, "observable 'bad' must be callable"),
        ({"step_size": 1e-3}, ValueError, "hyperparameters are only accepted with a kernel name"),
    ],
)
def test_bad_sample_arguments_fail_before_sampling(kwargs, exc, pattern):
    _, post, data = _linear_posterior()
    opts = {"eval_data": data["eval"], "probe_data": data["probe"], **kwargs}
    for key in ("eval_data", "probe_data"):
        if opts[key] == "DOUBLE":
            opts[key] = _double(data[key.split("_")[0]])
    with pytest.raises(exc, match=re.escape(pattern)):
        sample(post, Boom(), **opts)


def test_unknown_kernel_name():
    _, post, data = _linear_posterior()
    with pytest.raises(ValueError, match=r"unknown kernel 'nope'; registered kernels: \["):
        _run(post, data, "nope")


def test_kernel_instance_missing_protocol_methods():
    _, post, data = _linear_posterior()
    with pytest.raises(TypeError, match=r"lacks \['init', 'step', 'hyperparameters'"):
        _run(post, data, object())


def test_posterior_must_be_local_posterior():
    with pytest.raises(TypeError, match="posterior must be a LocalPosterior"):
        sample(object(), "sgld", eval_data=[], probe_data=[])


# ------------------------------------------------------------------- user kernels
class _MyState(NamedTuple):
    position: torch.Tensor
    count: torch.Tensor


class MyKernel:
    """Plain SGLD with a scale on the noise and a step counter reported per step."""

    name: ClassVar[str] = "test_my_kernel"
    full_batch: ClassVar[bool] = False

    def __init__(self, step_size: float = 1e-3, noise_scale: float = 1.0) -> None:
        self.step_size, self.noise_scale = step_size, noise_scale

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size, "noise_scale": self.noise_scale}

    def init(self, position, grad_fn, noise):
        return _MyState(position, torch.zeros(position.shape[0]))

    def step(self, state, grad_fn, noise):
        res = grad_fn(state.position)
        xi = noise.normal(state.position.shape[-1])
        pos = (
            state.position
            - 0.5 * self.step_size * res.grad
            + self.noise_scale * self.step_size**0.5 * xi
        )
        info = gradient_info(res)
        info["my_count"] = state.count + 1
        return _MyState(pos, state.count + 1), info


def test_user_registered_kernel_runs(registered):
    name = registered("test_my_kernel", MyKernel)
    assert name in bayes_susc.available_kernels()
    _, post, data = _linear_posterior()
    idata = _run(post, data, name, step_size=2e-3, noise_scale=0.5, num_draws=5, num_burnin=1)
    s, p = get_group(idata, "sample_stats"), get_group(idata, "posterior")
    assert np.array_equal(s["my_count"].values, np.tile(np.arange(2, 7, dtype=np.float32), (2, 1)))
    assert s["my_count"].dims == ("chain", "draw")
    assert p.attrs["kernel"] == name
    assert p.attrs["step_size"] == 2e-3 and p.attrs["noise_scale"] == 0.5
    config = json.loads(p.attrs["bayes_susc_config"])
    assert config["kernel_hyperparameters"] == {"step_size": 2e-3, "noise_scale": 0.5}
    assert np.isfinite(p["phi"].values).all()


def test_reregistering_a_kernel_needs_overwrite(registered):
    name = registered("test_my_kernel", MyKernel)
    with pytest.raises(ValueError, match="'test_my_kernel' is already registered"):
        register_kernel(name, SGLD)
    with pytest.raises(ValueError, match="'sgld' is already registered"):
        register_kernel("sgld", MyKernel)
    register_kernel(name, SGLD, overwrite=True)
    assert isinstance(make_kernel(name), SGLD)
    with pytest.raises(TypeError, match="must be callable"):
        register_kernel("test_not_callable", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        register_kernel("", MyKernel)
    assert "test_not_callable" not in bayes_susc.available_kernels()


# ----------------------------------------------------------------- output layout
def test_output_layout_and_attrs():
    _, post, data = _linear_posterior()
    tokens = ["a", "bb", "c", "dd", "e", "ff", "g"]
    idata = _run(
        post,
        data,
        "sgld",
        seed=4,
        num_chains=3,
        num_draws=5,
        probe_coords={"token": tokens, "position": list(range(7))},
        observables={
            "bias0": lambda m: m.bias[0],
            "w": lambda m: m.weight.reshape(-1),
            "W": lambda m: m.weight,
        },
    )
    assert set(group_names(idata)) == {"posterior", "sample_stats", "constant_data"}
    p, s, c = (get_group(idata, g) for g in ("posterior", "sample_stats", "constant_data"))
    assert p["phi"].dims == p["eval_loss"].dims == ("chain", "draw")
    assert p["phi"].shape == (3, 5)
    assert p["probe_loss"].dims == ("chain", "draw", "probe") and p["probe_loss"].shape == (3, 5, 7)
    assert p["bias0"].dims == ("chain", "draw")
    assert p["w"].dims == ("chain", "draw", "w_dim_0") and p["w"].shape == (3, 5, 3)
    assert p["W"].dims == ("chain", "draw", "W_dim_0", "W_dim_1") and p["W"].shape == (3, 5, 1, 3)
    for ds in (p, c):
        assert ds["token"].dims == ("probe",) and list(ds["token"].values) == tokens
        assert list(ds["position"].values) == list(range(7))
    assert list(p["probe"].values) == list(range(7))
    assert list(p["chain"].values) == [0, 1, 2] and list(p["draw"].values) == list(range(5))
    for name in ("loss", "potential", "grad_norm", "distance", "diverged"):
        assert s[name].dims == ("chain", "draw"), name
    assert c["eval_loss_anchor"].dims == () and c["probe_loss_anchor"].dims == ("probe",)
    for ds in (p, s, c):
        a = ds.attrs
        assert a["kernel"] == "sgld" and a["component"] == "component"
        assert a["nbeta"] == 30.0 and a["gamma"] == 300.0
        assert a["seed"] == 4 and a["step_size"] == 1e-3
        config = json.loads(a["bayes_susc_config"])
        assert config["chain_seeds"] == chain_seeds(4, 3)
        assert {"python", "torch", "numpy", "arviz", "xarray", "bayes_susc"} <= set(
            config["versions"]
        )
        assert config["versions"]["torch"] == version("torch")
        assert config["kernel"] == "sgld" and config["seed"] == 4
        assert config["num_chains"] == 3 and config["num_draws"] == 5
        assert config["component_spec"] == {"weight": "all (3)", "bias": "all (1)"}
        assert config["diverged_chains"] == []


def test_anchor_constants_and_phi():
    model, post, data = _linear_posterior()
    idata = _run(post, data, num_chains=2, num_draws=5)
    p, c = get_group(idata, "posterior"), get_group(idata, "constant_data")
    with torch.no_grad():
        probe_direct = torch.cat([sq_loss(model, b) for b in data["probe"]]).numpy()
        eval_direct = torch.cat([sq_loss(model, b) for b in data["eval"]]).mean().item()
    np.testing.assert_allclose(c["probe_loss_anchor"].values, probe_direct, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c["eval_loss_anchor"].values, eval_direct, rtol=1e-6)
    phi = p["phi"].values
    assert np.array_equal(phi, p["eval_loss"].values - c["eval_loss_anchor"].values)
    assert phi.dtype == np.float32


def test_probe_loss_order_and_distance_match_direct_evaluation():
    model, post, data = _linear_posterior()
    probe = data["probe"]
    idata = _run(
        post,
        data,
        "sghmc",
        num_chains=2,
        num_draws=6,
        observables={"weight": lambda m: m.weight, "bias": lambda m: m.bias},
    )
    p, s = get_group(idata, "posterior"), get_group(idata, "sample_stats")
    w_star = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    replica = torch.nn.Linear(3, 1)
    for chain, draw in [(0, 0), (1, 3), (0, 5)]:
        w = torch.from_numpy(p["weight"].values[chain, draw])
        b = torch.from_numpy(p["bias"].values[chain, draw])
        with torch.no_grad():
            replica.weight.copy_(w)
            replica.bias.copy_(b)
            direct = torch.cat([sq_loss(replica, batch) for batch in probe]).numpy()
            eval_direct = torch.cat([sq_loss(replica, batch) for batch in data["eval"]]).mean()
        # float32 with cancellation in (y - xw)^2: small losses carry ~1e-5 relative noise.
        np.testing.assert_allclose(
            p["probe_loss"].values[chain, draw], direct, rtol=1e-4, atol=1e-8
        )
        np.testing.assert_allclose(p["eval_loss"].values[chain, draw], eval_direct, rtol=1e-5)
        distance = torch.linalg.vector_norm(torch.cat([w.reshape(-1), b]) - w_star)
        np.testing.assert_allclose(s["distance"].values[chain, draw], distance, rtol=1e-4)
    # The items are genuinely distinct, so the order check has teeth.
    assert len(np.unique(p["probe_loss"].values[0, 0])) == 7


def test_kernel_statistics_mala_and_sgnht():
    _, post, data = _linear_posterior()
    mala = get_group(_run(post, data, "mala", num_draws=10, step_size=1e-3), "sample_stats")
    acc = mala["acceptance_rate"].values
    assert acc.shape == (2, 10) and np.all((acc >= 0) & (acc <= 1))
    assert set(np.unique(mala["accepted"].values)) <= {0.0, 1.0}
    sgnht = get_group(_run(post, data, "sgnht", num_draws=5), "sample_stats")
    assert sgnht["thermostat"].dims == ("chain", "draw")
    assert np.isfinite(sgnht["thermostat"].values).all()
    psgld = get_group(_run(post, data, "psgld", num_draws=5), "sample_stats")
    assert np.all(psgld["precond_mean"].values > 0)


# ----------------------------------------------------------------------- storage
# Both containers under ArviZ 0.x; only DataTree under ArviZ 1.x (no InferenceData).
@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(tmp_path, backend):
    _, post, data = _linear_posterior()
    kw = dict(backend=backend, probe_coords={"token": list("abcdefg")})
    idata = _run(post, data, **kw)
    expected_type = arviz.InferenceData if backend == "inferencedata" else xr.DataTree
    assert isinstance(idata, expected_type)
    target = tmp_path / "run.nc"
    assert save(idata, target) == target
    assert os.listdir(tmp_path) == ["run.nc"]
    for load_backend in BACKENDS:
        back = load(target, backend=load_backend)
        assert set(group_names(back)) == set(group_names(idata))
        for g in group_names(idata):
            xr.testing.assert_identical(get_group(back, g), get_group(idata, g))
    assert isinstance(load(target, backend=backend), expected_type)

    # Overwriting an existing file replaces it, and leaves no temporary file behind.
    other = _run(post, data, seed=9, **kw)
    save(other, target)
    assert os.listdir(tmp_path) == ["run.nc"]
    back = load(target, backend=backend)
    for g in group_names(other):
        xr.testing.assert_identical(get_group(back, g), get_group(other, g))


def test_default_backend_follows_the_installed_arviz(tmp_path):
    _, post, data = _linear_posterior()
    run = _run(post, data)
    target = tmp_path / "run.nc"
    save(run, target)
    if ARVIZ_MAJOR < 1:
        assert default_backend() == "inferencedata" and BACKENDS == ("inferencedata", "datatree")
        assert isinstance(run, arviz.InferenceData) and isinstance(load(target), type(run))
    else:
        assert default_backend() == "datatree" and BACKENDS == ("datatree",)
        assert isinstance(run, xr.DataTree) and isinstance(load(target), xr.DataTree)
        # InferenceData is gone in ArviZ 1.x: asking for it fails, naming the argument.
        need = r"backend='inferencedata' needs arviz<1"
        group = {"posterior": xr.Dataset({"phi": (("chain", "draw"), np.zeros((1, 4)))})}
        with pytest.raises(ValueError, match=need):
            make_inference_data(group, "inferencedata")
        with pytest.raises(ValueError, match=need):
            load(target, backend="inferencedata")
        with pytest.raises(ValueError, match=need):
            _run(post, data, backend="inferencedata")
    for bad in ("InferenceData", "auto", 1):
        with pytest.raises(ValueError, match="backend must be 'inferencedata', 'datatree' or None"):
            check_backend(bad)


def test_failed_save_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "run.nc"
    good = make_inference_data(
        {"posterior": xr.Dataset({"phi": (("chain", "draw"), np.zeros((1, 2)))})}, "datatree"
    )
    save(good, target)
    bad = make_inference_data(
        {"posterior": xr.Dataset({"phi": (("chain", "draw"), np.ones((1, 2)))}, attrs={"x": {}})},
        "datatree",
    )
    with pytest.raises(TypeError):
        save(bad, target)
    assert os.listdir(tmp_path) == ["run.nc"]
    xr.testing.assert_identical(get_group(load(target), "posterior"), get_group(good, "posterior"))


def test_save_creates_parent_folders(tmp_path):
    _, post, data = _linear_posterior()
    target = tmp_path / "a" / "b" / "run.nc"
    save(_run(post, data, num_draws=2), target)
    assert os.listdir(target.parent) == ["run.nc"]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file at"):
        load(tmp_path / "missing.nc")


def test_get_group_unknown_group():
    _, post, data = _linear_posterior()
    with pytest.raises(KeyError, match="no group 'prior'"):
        get_group(_run(post, data, num_draws=2), "prior")


# ------------------------------------------- name clashes, NumPy scalars, detached draws
def test_observable_named_like_builtin_is_rejected():
    _, post, data = _linear_posterior()
    with pytest.raises(ValueError, match="phi"):
        _run(post, data, observables={"phi": lambda m: m.bias.sum()})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"probe_coords": {"phi": list("abcdefg")}},
        {"probe_coords": {"eval_loss_anchor": list("abcdefg")}},
        {"observables": {"chain": lambda m: m.bias.sum()}},
        {
            "observables": {"token": lambda m: m.bias.sum()},
            "probe_coords": {"token": list("abcdefg")},
        },
    ],
)
def test_name_clashes_rejected_before_sampling(kwargs):
    _, post, data = _linear_posterior()
    kernel = CountingSGLD()
    with pytest.raises(ValueError, match="probe_coords|observable"):
        _run(post, data, kernel, **kwargs)
    assert kernel.steps == 0


class _SeedHyperKernel(MyKernel):
    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size, "seed": 123.0}


def test_kernel_hyperparameters_do_not_overwrite_run_attrs():
    _, post, data = _linear_posterior()
    idata = _run(post, data, _SeedHyperKernel(), seed=2)
    assert get_group(idata, "posterior").attrs["seed"] == 2


class _DivergedInfoKernel(MyKernel):
    def step(self, state, grad_fn, noise):
        state, info = super().step(state, grad_fn, noise)
        info["diverged"] = torch.zeros_like(info["loss"])
        return state, info


def test_kernel_info_named_diverged():
    _, post, data = _linear_posterior()
    with pytest.raises(ValueError, match="may not use the driver's names \\['diverged'\\]"):
        _run(post, data, _DivergedInfoKernel(), num_draws=4)


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": np.int64(1)}, {"num_draws": np.int64(3)}, {"step_size": np.float32(1e-3)}],
)
def test_numpy_scalar_arguments_accepted(kwargs):
    _, post, data = _linear_posterior()
    _run(post, data, **kwargs)


def test_observable_returning_frozen_parameter():
    model, post, data = _linear_posterior(component=["weight"])
    idata = _run(post, data, observables={"bias": lambda m: m.bias})
    bias = get_group(idata, "posterior")["bias"].values
    assert np.array_equal(bias, np.broadcast_to(model.bias.detach().numpy(), bias.shape))


def test_unregister_unknown_kernel_raises():
    with pytest.raises(ValueError, match="no kernel 'never_registered'"):
        unregister_kernel("never_registered")


def test_string_probe_data_rejected():
    _, post, data = _linear_posterior()
    with pytest.raises(TypeError, match="probe_data must be a batch or an iterable of batches"):
        _run(post, data, probe_data="tokens")


class _TupleStateKernel(SGLD):
    """SGLD keeping its state as a plain tuple (position, scratch)."""

    def init(self, position, grad_fn, noise):
        return (position, torch.zeros_like(position))

    def step(self, state, grad_fn, noise):
        new, info = super().step(super().init(state[0], grad_fn, noise), grad_fn, noise)
        return (new.position, state[1]), info


def test_plain_tuple_state_runs_and_matches_namedtuple_kernel():
    _, post, data = _linear_posterior()
    plain = get_group(_run(post, data, _TupleStateKernel(), seed=3), "posterior")
    named = get_group(_run(post, data, SGLD(), seed=3), "posterior")
    np.testing.assert_array_equal(plain["phi"].values, named["phi"].values)


class _NaNAuxKernel(SGLD):
    """SGLD whose auxiliary state (not its position) goes NaN in chain 0 at step 2."""

    def init(self, position, grad_fn, noise):
        return (position, torch.zeros_like(position), 0)

    def step(self, state, grad_fn, noise):
        new, info = super().step(super().init(state[0], grad_fn, noise), grad_fn, noise)
        aux = state[1].clone()
        if state[2] == 2:
            aux[0] = torch.nan
        return (new.position, aux, state[2] + 1), info


def test_nan_in_auxiliary_state_flags_the_chain_at_once():
    _, post, data = _linear_posterior()
    with pytest.warns(DivergenceWarning, match=r"chain\(s\) \[0\] .* step\(s\) \[2\]"):
        idata = _run(post, data, _NaNAuxKernel(), num_draws=6)
    diverged = get_group(idata, "sample_stats")["diverged"].values
    np.testing.assert_array_equal(diverged[0], [False, False, True, True, True, True])
    assert not diverged[1].any()
