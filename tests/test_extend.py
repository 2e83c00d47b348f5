"""Extending a run from its saved sampler state (issue 19, first slice): a run extended
in rounds equals, bit for bit on CPU, one uninterrupted run of the total length with the
same seed, also after the extending process was killed and the extension run again."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
import torch

from bayes_susc import DivergenceWarning, LocalPosterior, get_group, load, sample, save
from bayes_susc.kernels import gradient_info
from bayes_susc.sampling.driver import SAMPLER_STATE_GROUP
from bayes_susc.sampling.executor import concat_chains
from bayes_susc.storage.draws import group_names

KERNELS = ["sgld", "psgld", "sghmc", "sgnht", "mala"]
# Each kernel's state fields, as stored in the sampler_state group.
STATE_FIELDS = {
    "sgld": {"position"},
    "psgld": {"position", "square_avg"},
    "sghmc": {"position", "momentum"},
    "sgnht": {"position", "momentum", "thermostat"},
    "mala": {"position", "potential", "grad", "loss"},
}
# 3 burn-in steps + 5 draws × 2 steps = 13 steps over 6 batches: the extension starts
# in the middle of an epoch of the batch schedule.
SETTINGS = dict(num_chains=3, num_burnin=3, steps_per_draw=2, seed=7, progress=False)
TESTS_DIR = Path(__file__).resolve().parent


def sq_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, t = batch
    return 0.5 * (model(x).squeeze(-1) - t) ** 2


def _problem(component: tuple[str, ...] = ("weight", "bias")):
    """Linear(3, 1) at the weights that generated its data: posterior (6 training
    batches) and data.

    Not the least-squares fit: ``torch.linalg.lstsq`` (MKL, float32) was measured to
    differ in the last bits between processes, and the killed-extension test rebuilds
    this problem in a second process, where w* must come out bit for bit the same.
    """
    g = torch.Generator().manual_seed(0)
    # Explicit dtypes: the second process must not depend on a default another test set.
    X = torch.randn(48, 3, generator=g, dtype=torch.float32)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    y = (X * w).sum(-1) + 0.3 * torch.randn(48, generator=g, dtype=torch.float32)
    model = torch.nn.Linear(3, 1, dtype=torch.float32)
    with torch.no_grad():
        model.weight.copy_(w.unsqueeze(0))
        model.bias.zero_()
    data = {
        "train": [(X[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)],
        "eval": [(X[:24], y[:24]), (X[24:], y[24:])],
        "probe": [(X[:3], y[:3]), (X[3:7], y[3:7])],
    }
    post = LocalPosterior(model, sq_loss, data["train"], list(component))
    return post, data


def _sample(post, data, kernel: Any = "sgld", num_draws: int = 5, **kw):
    opts = dict(SETTINGS, eval_data=data["eval"], probe_data=data["probe"], keep_state=True)
    opts.update(kw)
    return sample(post, kernel, num_draws=num_draws, **opts)


def assert_same_run(got, want) -> None:
    """Every group, variable (values and dtype), coordinate and attribute equal, bit for
    bit, except the creation time."""
    assert sorted(group_names(got)) == sorted(group_names(want))
    for name in group_names(want):
        a, b = get_group(got, name), get_group(want, name)
        assert sorted(a.data_vars) == sorted(b.data_vars), name
        assert dict(a.sizes) == dict(b.sizes), name
        for var in b.data_vars:
            x, y = a[var].values, b[var].values
            assert x.dtype == y.dtype, (name, var, x.dtype, y.dtype)
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (name, var)
        for coord in b.coords:
            assert np.array_equal(a[coord].values, b[coord].values), (name, coord)
        strip = lambda attrs: {k: v for k, v in attrs.items() if k != "created_at"}  # noqa: E731
        assert strip(a.attrs) == strip(b.attrs), name


# ------------------------------------------------------------- bit for bit, per kernel
@pytest.mark.parametrize("kernel", KERNELS)
def test_extended_equals_uninterrupted(kernel):
    post, data = _problem()
    first = _sample(post, data, kernel, num_draws=5)
    extended = _sample(post, data, kernel, num_draws=4, resume_from=first)
    assert_same_run(extended, _sample(post, data, kernel, num_draws=9))
    state = get_group(extended, SAMPLER_STATE_GROUP)
    assert {v[len("state_") :] for v in state.data_vars if v.startswith("state_")} == (
        STATE_FIELDS[kernel]
    )
    assert int(state["steps_done"]) == 3 + 9 * 2
    # resume_from is left as it was: an interrupted extension can be run again.
    assert get_group(first, "posterior").sizes["draw"] == 5
    assert int(get_group(first, SAMPLER_STATE_GROUP)["steps_done"]) == 3 + 5 * 2


@pytest.mark.parametrize("kernel", ["sghmc", "mala"])
def test_extended_twice_equals_once_and_uninterrupted(kernel):
    post, data = _problem()
    kw = dict(steps_per_draw=1, num_burnin=0)
    first = _sample(post, data, kernel, num_draws=2, **kw)
    twice = _sample(post, data, kernel, num_draws=3, resume_from=first, **kw)
    twice = _sample(post, data, kernel, num_draws=4, resume_from=twice, **kw)
    once = _sample(post, data, kernel, num_draws=7, resume_from=first, **kw)
    assert_same_run(twice, once)
    full = _sample(post, data, kernel, num_draws=9, **kw)
    assert_same_run(twice, full)


def test_sequential_chains_and_chain_subset():
    """The sequential chain method and a ``chains`` subset extend the same way."""
    post, data = _problem()
    kw = dict(chain_method="sequential", chains=[2, 0])
    first = _sample(post, data, "sgnht", num_draws=3, **kw)
    extended = _sample(post, data, "sgnht", num_draws=2, resume_from=first, **kw)
    assert_same_run(extended, _sample(post, data, "sgnht", num_draws=5, **kw))
    assert get_group(extended, SAMPLER_STATE_GROUP)["chain"].values.tolist() == [2, 0]


def test_merged_chain_groups_extend():
    """Chain groups sampled apart and merged (as the executors do) extend as one run."""
    post, data = _problem()
    kw = dict(chain_method="sequential")  # sequential chains are bitwise independent
    parts = [_sample(post, data, "sgld", num_draws=3, chains=c, **kw) for c in ([0, 1], [2])]
    merged = concat_chains(parts)
    assert_same_run(merged, _sample(post, data, "sgld", num_draws=3, **kw))
    extended = _sample(post, data, "sgld", num_draws=2, resume_from=merged, **kw)
    assert_same_run(extended, _sample(post, data, "sgld", num_draws=5, **kw))


def test_user_observables_and_probe_coords_carry_on():
    post, data = _problem()
    kw = dict(
        observables={"w": lambda m: m.weight.detach().flatten()},
        probe_coords={"item": ["a", "b", "c", "d", "e", "f", "g"]},
    )
    first = _sample(post, data, "psgld", num_draws=3, **kw)
    extended = _sample(post, data, "psgld", num_draws=2, resume_from=first, **kw)
    assert_same_run(extended, _sample(post, data, "psgld", num_draws=5, **kw))


# ------------------------------------------------------------------------ divergence
class _CountState(NamedTuple):
    position: torch.Tensor
    t: torch.Tensor  # steps taken, (chains,): a kernel state with a counter


class NaNInjector:
    """SGLD that sets chain ``bad_chain``'s position to NaN at its step ``at_step``."""

    name: ClassVar[str] = "test_extend_nan_injector"
    full_batch: ClassVar[bool] = False

    def __init__(self, step_size: float = 1e-3, bad_chain: int = 1, at_step: int = 5) -> None:
        self.step_size, self.bad_chain, self.at_step = step_size, bad_chain, at_step

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size, "bad_chain": self.bad_chain, "at_step": self.at_step}

    def init(self, position, grad_fn, noise):
        return _CountState(position, torch.zeros(position.shape[0], dtype=torch.long))

    def step(self, state, grad_fn, noise):
        res = grad_fn(state.position)
        xi = noise.normal(state.position.shape[-1])
        pos = state.position - 0.5 * self.step_size * res.grad + self.step_size**0.5 * xi
        rows = torch.arange(pos.shape[0])
        inject = (state.t == self.at_step) & (rows == self.bad_chain)
        pos = torch.where(inject.unsqueeze(-1), torch.nan, pos)
        return _CountState(pos, state.t + 1), gradient_info(res)


def test_diverged_chain_stays_diverged():
    post, data = _problem()
    with pytest.warns(DivergenceWarning, match=r"chain\(s\) \[1\].*step\(s\) \[5\]"):
        first = _sample(post, data, NaNInjector(), num_draws=4)
    state = get_group(first, SAMPLER_STATE_GROUP)
    assert state["alive"].values.tolist() == [True, False, True]
    assert state["diverged_at"].values.tolist() == [-1, 5, -1]
    with pytest.warns(DivergenceWarning, match=r"step\(s\) \[5\]"):
        extended = _sample(post, data, NaNInjector(), num_draws=3, resume_from=first)
    with pytest.warns(DivergenceWarning):
        full = _sample(post, data, NaNInjector(), num_draws=7)
    assert_same_run(extended, full)
    phi = get_group(extended, "posterior")["phi"].values
    assert np.isnan(phi[1, 1:]).all() and np.isfinite(phi[[0, 2]]).all()
    assert get_group(extended, "sample_stats")["diverged"].values[1, 1:].all()
    assert get_group(extended, "posterior").attrs["num_diverged_chains"] == 1


# --------------------------------------------------------------------- save and load
def test_state_survives_save_and_load(tmp_path):
    post, data = _problem()
    first = _sample(post, data, "sgnht", num_draws=5)
    path = save(first, tmp_path / "first.nc")
    loaded = load(path)
    assert_same_run(loaded, first)  # dtypes (bool, uint8, int64, float32) kept
    extended = _sample(post, data, "sgnht", num_draws=4, resume_from=loaded)
    assert_same_run(extended, _sample(post, data, "sgnht", num_draws=9))
    # ... and its own file extends again.
    again = load(save(extended, tmp_path / "extended.nc"))
    assert_same_run(
        _sample(post, data, "sgnht", num_draws=1, resume_from=again),
        _sample(post, data, "sgnht", num_draws=10),
    )


def test_state_is_opt_in_and_costs_one_state_per_chain():
    post, data = _problem()
    plain = _sample(post, data, "sghmc", keep_state=False)
    assert SAMPLER_STATE_GROUP not in group_names(plain)  # existing results unchanged
    kept = _sample(post, data, "sghmc")
    for name in group_names(plain):
        a, b = get_group(kept, name), get_group(plain, name)
        for var in b.data_vars:
            assert np.array_equal(a[var].values, b[var].values), (name, var)
    state = get_group(kept, SAMPLER_STATE_GROUP)
    assert state.attrs == get_group(kept, "posterior").attrs
    dim, chains = post.dim, SETTINGS["num_chains"]
    assert state["state_position"].shape == (chains, dim)
    assert state["state_momentum"].shape == (chains, dim)
    assert state["noise_state"].dtype == np.uint8
    assert state["noise_state"].shape == (chains, 5056)  # torch's CPU generator (mt19937)
    per_chain = state.nbytes / chains
    assert per_chain < 2 * dim * 4 + 5056 + 64


# --------------------------------------------------------------- validation, up front
@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seed=8), "seed"),
        (dict(step_size=2e-3), "kernel_hyperparameters"),
        (dict(num_burnin=2), "num_burnin"),
        (dict(steps_per_draw=1), "steps_per_draw"),
        (dict(num_chains=2), "num_chains"),
        (dict(chain_method="sequential"), "chain_method"),
        (dict(kernel="sghmc"), "kernel"),
        (dict(chains=[0, 1]), "chains"),
        (dict(component=("weight",)), "component"),
        (dict(eval_data="first half"), "eval_data"),
        (dict(probe_data="fewer"), "probe_data"),
        (dict(observables={"w": lambda m: m.weight}), "observables"),
        (dict(probe_coords={"item": list("abcdefg")}), "probe_coords"),
    ],
)
def test_mismatched_run_raises_naming_the_field(change, field):
    post, data = _problem()
    first = _sample(post, data, "sgld", num_draws=2)
    change = dict(change)
    kernel = change.pop("kernel", "sgld")
    if "component" in change:
        post, _ = _problem(change.pop("component"))
    if change.get("eval_data") == "first half":
        change["eval_data"] = data["eval"][:1]
    if change.get("probe_data") == "fewer":
        change["probe_data"] = data["probe"][:1]
    with pytest.raises(ValueError, match=f"cannot be extended: .*{field}"):
        _sample(post, data, kernel, num_draws=2, resume_from=first, **change)


def test_invalid_resume_arguments(tmp_path):
    post, data = _problem()
    first = _sample(post, data, "sgld", num_draws=2)
    with pytest.raises(ValueError, match="num_draws"):
        _sample(post, data, "sgld", num_draws=0, resume_from=first)
    plain = _sample(post, data, "sgld", num_draws=2, keep_state=False)
    with pytest.raises(ValueError, match="lacks the group.*keep_state=True"):
        _sample(post, data, "sgld", num_draws=2, resume_from=plain)
    with pytest.raises(TypeError, match="resume_from must be a result"):
        _sample(post, data, "sgld", num_draws=2, resume_from=object())
    with pytest.raises(ValueError, match="resume_from cannot be combined with store"):
        _sample(post, data, "sgld", num_draws=2, resume_from=first, store=tmp_path / "s")
    with pytest.raises(ValueError, match="keep_state cannot be combined with store"):
        _sample(post, data, "sgld", num_draws=2, store=tmp_path / "s2")
    with pytest.raises(TypeError, match="keep_state must be True or False"):
        _sample(post, data, "sgld", num_draws=2, keep_state=1)


def test_state_that_cannot_be_stored_fails_before_sampling():
    class ListState(NaNInjector):
        def init(self, position, grad_fn, noise):
            return (position, 0)  # a Python int: not a per-chain tensor

    post, data = _problem()
    with pytest.raises(ValueError, match="state field 'field_1' is not a tensor"):
        _sample(post, data, ListState(), num_draws=2)


# ------------------------------------------------------------ killed during extension
_EXTEND_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
# Float reductions depend on the thread count: use the test process's, as a rerun would.
torch.set_num_threads({threads})
import test_extend as T
from bayes_susc import load, save
from bayes_susc.sampling import driver

src, dst, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
post, data = T._problem()
previous = load(src)
if slow:
    # Slow the extension down (values unchanged) so that it is surely killed mid-way.
    evaluate = driver.Evaluator.__call__
    calls = []

    def slow_call(self, positions):
        calls.append(1)
        if len(calls) == 3:
            print("started", flush=True)
        time.sleep(0.2)
        return evaluate(self, positions)

    driver.Evaluator.__call__ = slow_call
extended = T._sample(post, data, "sghmc", num_draws=40, resume_from=previous)
save(extended, dst)
print("done", flush=True)
"""


def test_extension_killed_midway_resumes_bit_for_bit(tmp_path):
    post, data = _problem()
    first_path = save(_sample(post, data, "sghmc", num_draws=5), tmp_path / "first.nc")
    digest = hashlib.sha256(first_path.read_bytes()).hexdigest()
    script = tmp_path / "extend.py"
    script.write_text(_EXTEND_SCRIPT.format(tests=str(TESTS_DIR), threads=torch.get_num_threads()))
    out = tmp_path / "extended.nc"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(script), str(first_path), str(out)]
    proc = subprocess.Popen([*cmd, "slow"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "started"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written ...
    assert hashlib.sha256(first_path.read_bytes()).hexdigest() == digest  # ... or touched
    # Run the extension again, to the end, in a fresh process.
    done = subprocess.run([*cmd, "fast"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        assert_same_run(load(out), _sample(post, data, "sghmc", num_draws=45))
