"""Divergence is flagged at the first kept draw whose recorded values are non-finite, not one
draw later, and a non-finite probe loss flags the chain too (issue 17, promise 11).

A one-weight model w (w* = 0) is moved by a deterministic kernel, w ← w + c_k per step for
chain k, so the position recorded at every kept draw is known exactly; the loss turns
non-finite past a threshold on w, on the eval items (phi) or on one probe item only.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
import torch

from bayes_susc import DivergenceWarning, LocalPosterior, get_group, sample
from bayes_susc.kernels import gradient_info

X = torch.tensor([1.0, 2.0])  # eval items: eval_loss(w) = mean(0.5 (w x)^2) = 1.25 w^2


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _loss_fn(eval_limit: float, probe_limit: float):
    """Per-item 0.5 (w x)^2; inf on every item once w > eval_limit, NaN on poisoned items
    once w > probe_limit."""

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, poisoned = batch
        out = 0.5 * model(x) ** 2
        out = torch.where(model.w > eval_limit, torch.inf, out)
        return torch.where(poisoned & (model.w > probe_limit), torch.nan, out)

    return loss


def _batch(x: torch.Tensor, poisoned: list[bool] | None = None) -> tuple[torch.Tensor, ...]:
    flags = torch.tensor(poisoned if poisoned is not None else [False] * len(x))
    return (x, flags)


class _State(NamedTuple):
    position: torch.Tensor


class March:
    """Moves chain k by ``increments[k]`` per step, no noise: positions are exact."""

    name: ClassVar[str] = "test_march"
    full_batch: ClassVar[bool] = False
    step_size: float = 1.0  # unused: the protocol asks for it

    def __init__(self, increments: tuple[float, ...]) -> None:
        self.increments = increments

    def hyperparameters(self) -> dict[str, Any]:
        return {"increments": list(self.increments)}

    def init(self, position, grad_fn, noise):
        return _State(position)

    def step(self, state, grad_fn, noise):
        res = grad_fn(state.position)  # the potential at the position the step starts from
        inc = torch.tensor(self.increments, dtype=state.position.dtype).unsqueeze(-1)
        return _State(state.position + inc), gradient_info(res)


def _posterior(eval_limit: float = np.inf, probe_limit: float = np.inf) -> LocalPosterior:
    train = [_batch(torch.tensor([1.0, -1.0]))]
    return LocalPosterior(_Scalar(), _loss_fn(eval_limit, probe_limit), train, ["w"], gamma=1.0)


def _sample(post: LocalPosterior, kernel: Any, probe: list[bool] | None = None, **kw: Any):
    probe_x = torch.tensor([0.5, 1.0, 1.5])
    opts: dict[str, Any] = dict(
        eval_data=_batch(X),
        probe_data=_batch(probe_x, probe or [False, False, False]),
        num_chains=2,
        num_draws=6,
        progress=False,
    )
    opts.update(kw)
    return sample(post, kernel, **opts)


def _diverged_steps(idata: Any) -> list[int]:
    config = json.loads(get_group(idata, "posterior").attrs["bayes_susc_config"])
    return config["diverged_at_step"]


@pytest.mark.parametrize(
    ("num_burnin", "steps_per_draw", "limit", "first_bad_draw", "bad_step", "cause"),
    [
        # Kept draw d at step d, position d + 1: w = 3 > 2.5 first at draw 2.
        (0, 1, 2.5, 2, 2, "non-finite phi or eval_loss"),
        # Kept draws at steps 2, 4, 6, ... (positions 3, 5, 7): w = 5 > 4.5 at draw 1.
        (1, 2, 4.5, 1, 4, "non-finite phi or eval_loss"),
        # Kept draws at steps 1, 3, 5, ... (positions 2, 4, 6): w = 4 > 3.5 at draw 1.
        (0, 2, 3.5, 1, 3, "non-finite phi or eval_loss"),
        # w = 3 > 2.5 after burn-in step 2: the potential at step 3 flags it before the
        # first kept draw (step 4), which is flagged.
        (4, 1, 2.5, 0, 3, "non-finite state or potential"),
    ],
)
def test_first_nonfinite_eval_loss_is_flagged_at_its_own_draw(
    num_burnin: int,
    steps_per_draw: int,
    limit: float,
    first_bad_draw: int,
    bad_step: int,
    cause: str,
) -> None:
    post = _posterior(eval_limit=limit)
    with pytest.warns(DivergenceWarning, match=re.escape("chain(s) [0]")) as rec:
        idata = _sample(
            post,
            March((1.0, 0.25)),
            num_burnin=num_burnin,
            steps_per_draw=steps_per_draw,
        )
    assert f"step(s) [{bad_step}] ({cause})" in str(rec[0].message)
    p, s = get_group(idata, "posterior"), get_group(idata, "sample_stats")
    want = np.arange(6) >= first_bad_draw
    np.testing.assert_array_equal(s["diverged"].values[0], want)
    assert not s["diverged"].values[1].any()
    # The flagged draws are NaN, the earlier ones are the exact losses of the positions.
    steps = num_burnin + steps_per_draw * (np.arange(6) + 1) - 1
    phi0 = np.where(want, np.nan, 1.25 * (steps + 1.0) ** 2)
    np.testing.assert_allclose(p["phi"].values[0], phi0, rtol=1e-6)
    np.testing.assert_allclose(p["phi"].values[1], 1.25 * (0.25 * (steps + 1.0)) ** 2, rtol=1e-6)
    assert np.isnan(p["probe_loss"].values[0, first_bad_draw:]).all()
    assert np.isnan(s["distance"].values[0, first_bad_draw:]).all()
    assert _diverged_steps(idata) == [bad_step, -1]
    assert get_group(idata, "posterior").attrs["num_diverged_chains"] == 1


def test_every_recorded_nonfinite_value_is_flagged() -> None:
    """Whatever makes the eval loss non-finite, no unflagged draw holds a non-finite phi,
    eval loss or probe loss, and the flag starts at the first such draw."""
    post = _posterior(eval_limit=2.5)
    with pytest.warns(DivergenceWarning):
        idata = _sample(post, March((1.0, 0.5)), num_draws=8)
    p, s = get_group(idata, "posterior"), get_group(idata, "sample_stats")
    div = s["diverged"].values
    finite = (
        np.isfinite(p["phi"].values)
        & np.isfinite(p["eval_loss"].values)
        & np.isfinite(p["probe_loss"].values).all(-1)
    )
    np.testing.assert_array_equal(div, ~finite)
    # w = d + 1 and w = (d + 1) / 2: past 2.5 first at draws 2 and 5.
    np.testing.assert_array_equal(div.argmax(axis=1), [2, 5])
    assert _diverged_steps(idata) == [2, 5]


def test_nonfinite_probe_loss_flags_the_chain_from_that_draw() -> None:
    # Probe item 1 turns NaN once w > 0.6: chain 0 (w = d + 1) at draw 0, chain 1
    # (w = (d + 1) / 4) at draw 2; phi and the position stay finite throughout.
    post = _posterior(probe_limit=0.6)
    with pytest.warns(DivergenceWarning, match=re.escape("chain(s) [0, 1]")) as rec:
        idata = _sample(post, March((1.0, 0.25)), probe=[False, True, False])
    message = str(rec[0].message)
    assert "step(s) [0, 2] (non-finite probe_loss; non-finite probe_loss)" in message
    s = get_group(idata, "sample_stats")
    np.testing.assert_array_equal(
        s["diverged"].values,
        [[True] * 6, [False, False, True, True, True, True]],
    )
    p = get_group(idata, "posterior")
    assert np.isnan(p["probe_loss"].values[0]).all()
    np.testing.assert_allclose(p["phi"].values[1, :2], [0.078125, 0.3125], rtol=1e-6)
    assert np.isnan(p["phi"].values[1, 2:]).all()
    assert _diverged_steps(idata) == [0, 2]


def test_probe_item_nan_at_every_draw_flags_sgld_chains_at_draw_zero() -> None:
    # Under SGLD w leaves w* = 0 at the first step; the poisoned probe item is NaN from
    # then on (for either sign of w), while the eval loss stays finite.
    model = _Scalar()

    def loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, poisoned = batch
        return torch.where(poisoned & (m.w != 0), torch.nan, 0.5 * m(x) ** 2)

    post = LocalPosterior(model, loss, [_batch(torch.tensor([1.0, -1.0]))], ["w"])
    with pytest.warns(DivergenceWarning, match=re.escape("step(s) [0, 0, 0]")) as rec:
        idata = _sample(post, "sgld", probe=[True, False, False], num_chains=3, step_size=1e-3)
    assert "non-finite probe_loss" in str(rec[0].message)
    assert get_group(idata, "sample_stats")["diverged"].values.all()
    assert _diverged_steps(idata) == [0, 0, 0]


def test_healthy_run_has_no_flag_and_no_warning() -> None:
    post = _posterior(eval_limit=100.0, probe_limit=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        idata = _sample(post, March((1.0, 0.25)), probe=[False, True, False])
    assert not get_group(idata, "sample_stats")["diverged"].values.any()
    assert _diverged_steps(idata) == [-1, -1]
