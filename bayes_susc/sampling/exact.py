"""Exact (Metropolis-corrected) samplers for auditing an SG estimate on a small component.

SG kernels carry a step-size bias; MALA and NUTS do not: both sample the full-batch
local posterior itself. Two ways to compute a response-matrix column exactly:

- ``bayes_susc.sample(posterior, "mala", step_size=...)``: our MALA kernel, vectorized
  over chains like every other kernel (tune ``step_size`` for acceptance ≈ 0.6–0.9;
  ``sample_stats.acceptance_rate`` reports it).
- :func:`sample_nuts`: Pyro's NUTS (adaptive step size and mass matrix) on
  :meth:`LocalPosterior.potential_fn`, with the observables evaluated at its draws and
  the result laid out exactly like :func:`bayes_susc.sample`'s, so
  :func:`bayes_susc.estimation.susceptibility.estimate` and the response matrix take it as is.

Both evaluate the full training set at every step: use them for components of up to a
few thousand weights and modest data, as a reference, not for a whole model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bayes_susc.sampling.driver import (
    Evaluator,
    Observable,
    chain_seeds,
    check_probe_coords,
    draws_to_inference_data,
    run_attrs,
)
from bayes_susc.storage.draws import Backend, check_backend
from bayes_susc.target.posterior import LocalPosterior, as_batch_list
from bayes_susc.validation import check_fraction, check_int


class _NUTSDescription:
    """What the run attributes record about the NUTS settings."""

    name = "nuts"

    def __init__(self, target_accept_prob: float, num_warmup: int, max_tree_depth: int) -> None:
        self.settings = {
            "target_accept_prob": target_accept_prob,
            "num_warmup": num_warmup,
            "max_tree_depth": max_tree_depth,
        }

    def hyperparameters(self) -> dict[str, float]:
        return dict(self.settings)


def sample_nuts(
    posterior: LocalPosterior,
    *,
    eval_data: Any,
    probe_data: Any,
    num_chains: int = 4,
    num_draws: int = 200,
    num_warmup: int = 200,
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    observables: Mapping[str, Observable] | None = None,
    probe_coords: Mapping[str, Sequence[Any]] | None = None,
    progress: bool | None = None,
    backend: Backend | None = None,
) -> Any:
    """Sample the full-batch local posterior with Pyro's NUTS; same output as ``sample``.

    Args:
        posterior: the component's local posterior (its full training set is used).
        eval_data: the evaluation set E, as for :func:`bayes_susc.sample`.
        probe_data: the probe items, as for :func:`bayes_susc.sample`.
        num_chains: independent NUTS chains, run one after another, all from w*.
        num_draws: kept draws per chain (after ``num_warmup`` adaptation steps).
        seed: chain k uses seed ``chain_seeds(seed, num_chains)[k]``.
        target_accept_prob: NUTS step-size adaptation target in (0, 1).
        max_tree_depth: cap on NUTS tree doubling.
        progress: Pyro's progress bar; ``None`` shows it only on a terminal.
        observables: extra observables, as for :func:`bayes_susc.sample`.
        probe_coords: probe metadata, as for :func:`bayes_susc.sample`.
        backend: ``"inferencedata"`` or ``"datatree"``, as for :func:`bayes_susc.sample`.

    Returns:
        ArviZ container with ``posterior`` (``phi``, ``eval_loss``, ``probe_loss``, user
        observables), ``sample_stats`` (``potential``, ``distance``,
        ``divergent_transition``: NUTS divergences, counted in attrs
        ``num_divergent_transitions``; ``diverged`` stays False, since a NUTS divergence
        rejects one trajectory and the chain goes on) and ``constant_data``.
    """
    from pyro.infer import MCMC, NUTS

    if not isinstance(posterior, LocalPosterior):
        raise TypeError(f"posterior must be a LocalPosterior, got {type(posterior).__name__}")
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_draws = check_int("num_draws", num_draws, minimum=1)
    num_warmup = check_int("num_warmup", num_warmup, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth, minimum=1)
    target_accept_prob = check_fraction("target_accept_prob", target_accept_prob, open_low=True)
    backend = check_backend(backend)  # before sampling: InferenceData needs ArviZ < 1
    evaluator = Evaluator(
        posterior,
        as_batch_list("eval_data", eval_data),
        as_batch_list("probe_data", probe_data),
        observables or {},
    )
    coords = check_probe_coords(probe_coords, int(evaluator.probe_loss_anchor.numel()))
    show = sys.stderr.isatty() if progress is None else bool(progress)
    seeds = chain_seeds(seed, num_chains)
    draws: dict[str, list[np.ndarray]] = {}
    stats: dict[str, list[np.ndarray]] = {
        "potential": [],
        "distance": [],
        "diverged": [],
        "divergent_transition": [],
    }
    for chain_seed in seeds:
        torch.manual_seed(chain_seed)
        kernel = NUTS(
            potential_fn=posterior.potential_fn,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
        )
        mcmc = MCMC(
            kernel,
            num_samples=num_draws,
            warmup_steps=num_warmup,
            initial_params=posterior.initial_params,
            disable_progbar=not show,
        )
        with warnings.catch_warnings():
            # Pyro warns when it cannot parallelise chains; ours run one by one anyway.
            warnings.simplefilter("ignore", UserWarning)
            mcmc.run()
        positions = mcmc.get_samples()["v"].detach()  # (num_draws, dim)
        for name, value in evaluator(positions).items():
            draws.setdefault(name, []).append(value.cpu().numpy())
        with torch.no_grad():
            potential = torch.stack([posterior.potential_fn({"v": p}) for p in positions])
        stats["potential"].append(potential.cpu().numpy())
        distance = (positions - posterior.anchor_vector).norm(dim=-1)
        stats["distance"].append(distance.cpu().numpy())
        # A NUTS divergence rejects one trajectory; the chain goes on, unlike an SG
        # chain that went non-finite, so it is counted, not marked as a dead chain.
        divergent = np.zeros(num_draws, dtype=bool)
        indices = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
        divergent[[i for i in indices if 0 <= i < num_draws]] = True
        stats["divergent_transition"].append(divergent)
        stats["diverged"].append(np.zeros(num_draws, dtype=bool))
    rec = {k: np.stack(v) for k, v in draws.items()}
    st = {k: np.stack(v) for k, v in stats.items()}
    settings = {
        "seed": seed,
        "chain_seeds": seeds,
        "num_chains": num_chains,
        "num_draws": num_draws,
        "num_burnin": num_warmup,
        "steps_per_draw": 1,
        "chain_method": "sequential",
        "num_train_batches": len(posterior.train_batches),
        "num_eval_batches": len(evaluator.eval_batches),
    }
    description = _NUTSDescription(target_accept_prob, num_warmup, max_tree_depth)
    chain_ids = list(range(num_chains))
    attrs = run_attrs(posterior, description, settings, np.full(num_chains, -1), chain_ids)
    attrs["num_divergent_transitions"] = int(st["divergent_transition"].sum())
    return draws_to_inference_data(rec, st, evaluator, coords, attrs, backend, chain_ids)
