"""The sampling driver: one function, any registered kernel, chains vectorized.

``sample`` owns seeds, the minibatch schedule, burn-in, thinning, divergence handling,
the progress bar and the evaluation of observables at kept draws; the kernel owns only
the update. Output is an ArviZ container (DESIGN.md §3).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from bayes_susc.errors import DivergenceWarning
from bayes_susc.kernels.base import Kernel, NoiseSource, make_kernel
from bayes_susc.storage.draws import Backend, make_inference_data
from bayes_susc.storage.streaming import DrawWriter, check_store_args, open_store
from bayes_susc.target.posterior import Batch, BoundFunction, LocalPosterior, as_batch_list
from bayes_susc.validation import check_int

Observable = Callable[[torch.nn.Module], torch.Tensor]
ChainMethod = Literal["vectorized", "sequential"]

_DATA_ORDER_KEY = 0xDA7A
# Names the driver writes itself; user observables, probe coordinates and kernel
# statistics may not take them.
_RESERVED_NAMES = frozenset(
    {
        "chain",
        "draw",
        "probe",
        "phi",
        "eval_loss",
        "probe_loss",
        "eval_loss_anchor",
        "probe_loss_anchor",
    }
)
_DRIVER_STATS = frozenset({"distance", "diverged"})
# Why a chain was flagged, by code (0: it was not), for the DivergenceWarning; a chain keeps
# the first cause found.
_DIVERGENCE_CAUSES = (
    "",
    "non-finite state or potential",
    "non-finite phi or eval_loss",
    "non-finite probe_loss",
    "non-finite distance",
)
_CAUSE_STATE, _CAUSE_EVAL, _CAUSE_PROBE, _CAUSE_DISTANCE = 1, 2, 3, 4


def chain_seeds(seed: int, num_chains: int) -> list[int]:
    """Per-chain noise seeds; chain k's seed depends on (seed, k) only."""
    return [
        int(np.random.SeedSequence(seed, spawn_key=(k,)).generate_state(1)[0])
        for k in range(num_chains)
    ]


def _batch_schedule(num_batches: int, num_steps: int, seed: int) -> np.ndarray:
    """Batch index per step: every epoch visits each batch once, in a seeded order."""
    rng = np.random.default_rng([seed, _DATA_ORDER_KEY])
    epochs = -(-num_steps // num_batches)
    order = [rng.permutation(num_batches) for _ in range(epochs)]
    return np.concatenate(order)[:num_steps] if order else np.zeros(0, dtype=int)


def _where_alive(alive: torch.Tensor, new: Any, old: Any) -> Any:
    """Keep each tensor field of ``old`` for dead chains (leading axis = chain)."""
    fields = []
    for n, o in zip(new, old):
        if isinstance(n, torch.Tensor):
            mask = alive.reshape((-1,) + (1,) * (n.dim() - 1))
            fields.append(torch.where(mask, n, o))
        else:
            fields.append(n)
    # NamedTuple states rebuild from positional fields; plain tuples from an iterable.
    return type(new)(*fields) if hasattr(new, "_fields") else type(new)(fields)


def _rows_finite(value: torch.Tensor, num_chains: int) -> torch.Tensor:
    """Per chain: every entry of ``value`` (leading axis = chain) is finite, ``(chains,)``."""
    return torch.isfinite(value.reshape(num_chains, -1)).all(-1)


def _state_finite(state: Any, num_chains: int) -> torch.Tensor:
    """Per chain: every floating field of the kernel state is finite, ``(chains,)``."""
    finite = torch.ones(num_chains, dtype=torch.bool, device=state[0].device)
    for field in state:
        if isinstance(field, torch.Tensor) and field.is_floating_point():
            finite = finite & torch.isfinite(field.reshape(num_chains, -1)).all(-1)
    return finite


class Evaluator:
    """Observables at kept draws: φ, eval loss, per-item probe losses, user functions."""

    def __init__(
        self,
        posterior: LocalPosterior,
        eval_batches: list[Batch],
        probe_batches: list[Batch],
        observables: Mapping[str, Observable],
    ) -> None:
        self.posterior = posterior
        self.eval_batches = eval_batches
        self.probe_batches = probe_batches
        # Checking each batch evaluates it at w*: those are the anchor values.
        eval_anchor = torch.cat([posterior.check_batch("eval_data", b) for b in eval_batches])
        self.eval_loss_anchor = eval_anchor.mean()
        self.probe_loss_anchor = torch.cat(
            [posterior.check_batch("probe_data", b) for b in probe_batches]
        )
        self.user = {}
        for name, fn in observables.items():
            if not callable(fn):
                raise TypeError(f"observable {name!r} must be callable as fn(model), got {fn!r}")
            bound = BoundFunction(posterior.model, fn)

            def single(v: torch.Tensor, bound: torch.nn.Module = bound) -> torch.Tensor:
                params = {"model." + k: t for k, t in posterior.params_from(v).items()}
                return functional_call(bound, params, (), strict=False)

            if name in _RESERVED_NAMES:
                raise ValueError(
                    f"observables may not be named {name!r}: reserved names are "
                    f"{sorted(_RESERVED_NAMES)}"
                )
            with torch.no_grad():
                value = single(posterior.anchor_vector)
            if not isinstance(value, torch.Tensor) or not torch.isfinite(value).all():
                raise ValueError(
                    f"observable {name!r} must return a finite Tensor at w*, got {value!r}"
                )
            self.user[name] = (vmap(single), tuple(value.shape))

    def __call__(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Observable values at ``positions`` (``(chains, dim)``), each ``(chains, ...)``."""
        eval_loss = self.posterior.batch_item_losses(positions, self.eval_batches).mean(-1)
        out = {
            "phi": eval_loss - self.eval_loss_anchor,
            "eval_loss": eval_loss,
            "probe_loss": self.posterior.batch_item_losses(positions, self.probe_batches),
        }
        with torch.no_grad():
            for name, (fn, _) in self.user.items():
                # An observable may return a live (frozen) parameter: record values only.
                out[name] = fn(positions).detach()
        return out


#: The keywords of :func:`sample` other than ``posterior``, ``kernel`` and the kernel's
#: hyperparameters: what the executors pass through to it as run settings.
SAMPLE_KEYWORDS = frozenset(
    {
        "eval_data",
        "probe_data",
        "num_chains",
        "num_draws",
        "num_burnin",
        "steps_per_draw",
        "seed",
        "observables",
        "probe_coords",
        "chain_method",
        "progress",
        "backend",
        "chains",
        "store",
        "chunk_draws",
    }
)


def sample(
    posterior: LocalPosterior,
    kernel: str | Kernel = "sgld",
    *,
    eval_data: Any,
    probe_data: Any,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin: int = 0,
    steps_per_draw: int = 1,
    seed: int = 0,
    observables: Mapping[str, Observable] | None = None,
    probe_coords: Mapping[str, Sequence[Any]] | None = None,
    chain_method: ChainMethod = "vectorized",
    progress: bool | None = None,
    backend: Backend | None = None,
    chains: Sequence[int] | None = None,
    store: str | os.PathLike | None = None,
    chunk_draws: int | None = None,
    **kernel_kwargs: Any,
) -> Any:
    """Sample the local posterior and record observables at kept draws.

    Args:
        posterior: the target (model, loss, training batches, component, nβ, γ).
        kernel: a registered kernel name (``"sgld"``, ``"psgld"``, ``"sghmc"``,
            ``"sgnht"``, ``"mala"``, or a user's) or a kernel instance.
        eval_data: the evaluation set E (a batch or list of batches), the same items at
            every draw; φ = L_E(w) − L_E(w*) and ``eval_loss`` = L_E(w) come from it.
        probe_data: probe items (a batch or list of batches); ``probe_loss`` holds every
            item's loss (every element of ``loss_fn``'s output, flattened in order).
        num_chains: independent chains, all started at w*.
        num_draws: kept draws per chain.
        num_burnin: steps discarded before the first kept draw.
        steps_per_draw: kernel steps between kept draws (thinning).
        seed: master seed; chain k's noise and the minibatch order derive from it.
        observables: extra ``name -> fn(model) -> Tensor`` recorded at each draw.
        probe_coords: metadata per probe item (e.g. ``{"token": [...]}``), each of
            length ``num_probe``; stored as coordinates on the ``probe`` dimension.
        chain_method: ``"vectorized"`` (all chains in one ``vmap``'d call) or
            ``"sequential"`` (one chain after another, same draws up to rounding).
        progress: tqdm bar; ``None`` shows it only when stderr is a terminal.
        backend: ``"inferencedata"`` or ``"datatree"``; default follows ArviZ's version.
        chains: compute only these chains (distinct indices in ``[0, num_chains)``) of
            the ``num_chains``-chain run; each equals its chain of the full run (to float
            rounding when vectorized), so runs of disjoint chain groups can be merged
            (:func:`bayes_susc.sampling.executor.concat_chains`). The ``chain`` coordinate holds
            these indices; attrs record them as ``chains``. Default: all chains.
        store: a new directory: stream kept draws to a zarr store there as they are
            produced (:mod:`bayes_susc.storage.streaming`), so memory holds at most
            ``chunk_draws`` draws per chain; the result is then read lazily from the
            store (same layout). ``None`` (default): keep every draw in memory.
        chunk_draws: kept draws per chain buffered on the device between writes to
            ``store`` (only with ``store``); default: 50, or fewer so that the buffered
            probe losses (chains × draws × probe items) stay within 2²¹ values.
        **kernel_kwargs: hyperparameters for a kernel given by name (e.g. ``step_size``).

    Returns:
        ArviZ ``InferenceData`` (or ``DataTree``) with groups ``posterior`` (``phi``,
        ``eval_loss`` (chain, draw), ``probe_loss`` (chain, draw, probe), user
        observables), ``sample_stats`` (``loss``, ``potential``, ``grad_norm``,
        ``distance``, ``diverged``, kernel statistics) and ``constant_data``
        (observables at w*). A chain diverges at the first step whose state or potential is
        non-finite, or at the first kept draw whose phi, eval_loss, a probe_loss or
        distance is; from then on its draws are NaN and flagged in ``diverged``.
    """
    if not isinstance(posterior, LocalPosterior):
        raise TypeError(f"posterior must be a LocalPosterior, got {type(posterior).__name__}")
    kernel = make_kernel(kernel, **kernel_kwargs)
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_draws = check_int("num_draws", num_draws, minimum=1)
    num_burnin = check_int("num_burnin", num_burnin, minimum=0)
    steps_per_draw = check_int("steps_per_draw", steps_per_draw, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    streamed = check_store_args(store, chunk_draws, num_draws)  # (path, chunk) or None
    if chain_method not in ("vectorized", "sequential"):
        raise ValueError(f"chain_method must be 'vectorized' or 'sequential', got {chain_method!r}")
    eval_batches = as_batch_list("eval_data", eval_data)
    probe_batches = as_batch_list("probe_data", probe_data)
    evaluator = Evaluator(posterior, eval_batches, probe_batches, observables or {})
    num_probe = int(evaluator.probe_loss_anchor.numel())
    coords = check_probe_coords(probe_coords, num_probe)
    clash = sorted(set(coords) & set(evaluator.user))
    if clash:
        raise ValueError(f"observables and probe_coords share the names {clash}; rename one")

    chain_ids = _check_chains(chains, num_chains)
    all_seeds = chain_seeds(seed, num_chains)
    seeds = [all_seeds[k] for k in chain_ids]
    run_chains = len(chain_ids)  # chains computed by this call
    noise = NoiseSource(seeds, posterior.device, posterior.dtype)
    num_steps = num_burnin + num_draws * steps_per_draw
    schedule = _batch_schedule(len(posterior.train_batches), num_steps, seed)
    start = posterior.anchor_vector.unsqueeze(0).expand(run_chains, -1).clone()
    show = sys.stderr.isatty() if progress is None else bool(progress)
    groups_of_chains = (
        [list(range(run_chains))]
        if chain_method == "vectorized"
        else [[k] for k in range(run_chains)]
    )
    records, stats, diverged_at, causes = [], [], [], []
    writer = None
    if streamed is not None:
        writer = DrawWriter(
            streamed[0],
            chain_ids=chain_ids,
            num_draws=num_draws,
            chunk_draws=streamed[1],
            probe_coords=coords,
            num_probe=num_probe,
        )
    with tqdm(
        total=num_steps * len(groups_of_chains),
        disable=not show,
        desc=f"{posterior.component.name} [{kernel.name}]",
        unit="step",
    ) as bar:
        for group in groups_of_chains:
            sub_noise = noise if len(group) == run_chains else noise.subset(group[0])
            sink = None  # streaming: where this group's chunks of draws go
            if writer is not None:
                sink = partial(writer.append, slice(group[0], group[-1] + 1))
            rec, st, div, why = _run(
                posterior,
                kernel,
                evaluator,
                start[group],
                sub_noise,
                schedule,
                num_burnin,
                steps_per_draw,
                bar,
                sink=sink,
                sink_every=0 if writer is None else writer.chunk_draws,
            )
            records.append(rec)
            stats.append(st)
            diverged_at.append(div)
            causes.append(why)
    rec = {k: np.concatenate([r[k] for r in records], axis=0) for k in records[0]}
    st = {k: np.concatenate([s[k] for s in stats], axis=0) for k in stats[0]}
    diverged_step = np.concatenate(diverged_at)
    cause = np.concatenate(causes)
    bad = np.flatnonzero(diverged_step >= 0)
    if bad.size:
        bad_ids = [chain_ids[i] for i in bad]
        why = "; ".join(_DIVERGENCE_CAUSES[c] for c in cause[bad])
        warnings.warn(
            f"chain(s) {bad_ids} of component {posterior.component.name!r} diverged at "
            f"step(s) {diverged_step[bad].tolist()} ({why}); their draws from then on are NaN "
            f"and flagged in sample_stats.diverged, and the other {run_chains - bad.size} "
            "chain(s) finished. Lower step_size or raise gamma.",
            DivergenceWarning,
            stacklevel=2,
        )
    settings = {
        "seed": seed,
        "chain_seeds": seeds,
        "num_chains": num_chains,
        "num_draws": num_draws,
        "num_burnin": num_burnin,
        "steps_per_draw": steps_per_draw,
        "chain_method": chain_method,
        "num_train_batches": len(posterior.train_batches),
        "num_eval_batches": len(eval_batches),
    }
    if chains is not None:
        settings["chains"] = chain_ids
    attrs = run_attrs(posterior, kernel, settings, diverged_step, chain_ids)
    if writer is not None:
        anchors = (evaluator.eval_loss_anchor, evaluator.probe_loss_anchor)
        writer.close(*(a.cpu().numpy() for a in anchors), attrs)
        return open_store(writer.path, backend)
    return draws_to_inference_data(rec, st, evaluator, coords, attrs, backend, chain_ids)


def _check_chains(chains: Sequence[int] | None, num_chains: int) -> list[int]:
    """The chain indices to compute: all of ``range(num_chains)``, or the distinct ones given."""
    if chains is None:
        return list(range(num_chains))
    if isinstance(chains, (str, bytes)) or not isinstance(chains, Sequence):
        raise TypeError(f"chains must be a sequence of chain indices, got {chains!r}")
    ids = [check_int("chain index", k, minimum=0) for k in chains]
    if not ids or len(set(ids)) != len(ids) or max(ids) >= num_chains:
        raise ValueError(
            f"chains must be distinct indices in [0, num_chains={num_chains}), at least one; "
            f"got {list(chains)}"
        )
    return ids


def _run(
    posterior: LocalPosterior,
    kernel: Kernel,
    evaluator: Evaluator,
    start: torch.Tensor,
    noise: NoiseSource,
    schedule: np.ndarray,
    num_burnin: int,
    steps_per_draw: int,
    bar: tqdm,
    sink: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
    sink_every: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Run one group of chains; returns draws, step statistics, divergence step (-1: none)
    and divergence cause (an index into ``_DIVERGENCE_CAUSES``) per chain.

    With ``sink``, every ``sink_every`` kept draws (and the rest at the end) are handed
    to ``sink(draws, stats)`` as (chains, k, ...) arrays and dropped, and the returned
    draws and statistics are empty.
    """
    batches = posterior.train_batches

    def grad_for(step: int) -> Callable[[torch.Tensor], Any]:
        if kernel.full_batch:
            return posterior.full_potential_and_grad
        batch = batches[schedule[step]] if len(schedule) else batches[0]
        return lambda positions: posterior.potential_and_grad(positions, batch)

    state = kernel.init(start, grad_for(0), noise)
    num_chains = start.shape[0]
    alive = torch.ones(num_chains, dtype=torch.bool, device=start.device)
    diverged_at = torch.full((num_chains,), -1, dtype=torch.long, device=start.device)
    cause = torch.zeros(num_chains, dtype=torch.long, device=start.device)
    draws: dict[str, list[torch.Tensor]] = {}
    step_stats: dict[str, list[torch.Tensor]] = {}
    since_update = 0
    for t in range(len(schedule)):
        new_state, info = kernel.step(state, grad_for(t), noise)
        if t == 0:
            _check_info(kernel, info)
        # Device-side bookkeeping only: no host sync per step.
        finite = torch.isfinite(info["potential"]) & _state_finite(new_state, num_chains)
        diverged_at = torch.where(alive & ~finite, t, diverged_at)
        cause = torch.where(alive & ~finite, _CAUSE_STATE, cause)
        alive = alive & finite
        state = _where_alive(alive, new_state, state)
        since_update += 1
        if t >= num_burnin and (t - num_burnin + 1) % steps_per_draw == 0:
            position = state[0]
            values = evaluator(position)
            values_stats = dict(info)
            values_stats["distance"] = (position - posterior.anchor_vector).norm(dim=-1)
            # The kernel reports the potential at the position its step starts from, so a
            # position whose loss is non-finite would be caught only at the next step, one
            # draw late, and probe losses never: the values recorded here are checked too.
            checks = (
                (_CAUSE_EVAL, _rows_finite(values["phi"], num_chains)),
                (_CAUSE_EVAL, _rows_finite(values["eval_loss"], num_chains)),
                (_CAUSE_PROBE, _rows_finite(values["probe_loss"], num_chains)),
                (_CAUSE_DISTANCE, torch.isfinite(values_stats["distance"])),
            )
            for code, ok in checks:
                hit = alive & ~ok
                diverged_at = torch.where(hit, t, diverged_at)
                cause = torch.where(hit, code, cause)
                alive = alive & ok
            dead = ~alive
            for name, value in values.items():
                mask = dead.reshape((-1,) + (1,) * (value.dim() - 1))
                draws.setdefault(name, []).append(torch.where(mask, torch.nan, value))
            for name, value in values_stats.items():
                step_stats.setdefault(name, []).append(
                    torch.where(dead, torch.nan, value.to(position.dtype))
                )
            step_stats.setdefault("diverged", []).append(dead)
            if sink is not None and len(step_stats["diverged"]) == sink_every:
                # Streaming: host memory holds one chunk of draws, never the whole run.
                sink(_to_host(draws), _to_host(step_stats))
                draws.clear()
                step_stats.clear()
            bar.update(since_update)
            since_update = 0
    bar.update(since_update)
    if sink is not None and step_stats:
        sink(_to_host(draws), _to_host(step_stats))  # the last, shorter chunk
        draws.clear()
        step_stats.clear()
    to_np = {k: torch.stack(v, dim=1).cpu().numpy() for k, v in draws.items()}
    stats_np = {k: torch.stack(v, dim=1).cpu().numpy() for k, v in step_stats.items()}
    return to_np, stats_np, diverged_at.cpu().numpy(), cause.cpu().numpy()


def _to_host(values: Mapping[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per-draw device tensors (chains, ...) stacked along draw, as host arrays (chains, k, ...)."""
    return {k: torch.stack(v, dim=1).cpu().numpy() for k, v in values.items()}


def _check_info(kernel: Kernel, info: Mapping[str, torch.Tensor]) -> None:
    """The kernel's per-step statistics: the required ones, none named like the driver's."""
    missing = {"loss", "potential", "grad_norm"} - set(info)
    clash = sorted((_DRIVER_STATS | _RESERVED_NAMES) & set(info))
    if missing or clash:
        raise ValueError(
            f"kernel {kernel.name!r} step info must hold loss, potential and grad_norm "
            f"(missing {sorted(missing)}) and may not use the driver's names {clash}"
        )


def check_probe_coords(
    probe_coords: Mapping[str, Sequence[Any]] | None, num_probe: int
) -> dict[str, np.ndarray]:
    """Validate the per-probe-item labels of a run: one array of length ``num_probe`` per
    name, no reserved name (raises ``ValueError`` naming the offender)."""
    if num_probe == 0:
        raise ValueError("probe_data holds no items")
    coords = {}
    for name, values in (probe_coords or {}).items():
        arr = np.asarray(list(values))
        if arr.shape != (num_probe,):
            raise ValueError(
                f"probe_coords[{name!r}] must have one entry per probe item ({num_probe}), "
                f"got shape {arr.shape}"
            )
        if name in _RESERVED_NAMES:
            raise ValueError(
                f"probe_coords may not be named {name!r}: reserved names are "
                f"{sorted(_RESERVED_NAMES)}"
            )
        coords[name] = arr
    return coords


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("bayes_susc", "torch", "pyro-ppl", "arviz", "numpy", "xarray"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run_attrs(
    posterior: LocalPosterior,
    kernel: Kernel,
    settings: dict[str, Any],
    diverged_step: np.ndarray,
    chain_ids: Sequence[int],
) -> dict[str, Any]:
    """Run attributes: enough to rerun (hyperparameters, seeds, versions) and the faults."""
    config = {
        **posterior.describe(),
        "kernel": kernel.name,
        "kernel_hyperparameters": kernel.hyperparameters(),
        **settings,
        "dtype": str(posterior.dtype),
        "device": str(posterior.device),
        "versions": _versions(),
        "diverged_chains": [chain_ids[i] for i in np.flatnonzero(diverged_step >= 0)],
        "diverged_at_step": diverged_step.tolist(),
    }
    attrs = {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "inference_library": "bayes_susc",
        "bayes_susc_config": json.dumps(config),
        "component": posterior.component.name,
        "kernel": kernel.name,
        "nbeta": posterior.nbeta,
        "gamma": posterior.gamma,
        "seed": settings["seed"],
        "num_diverged_chains": int((diverged_step >= 0).sum()),
    }
    for key, value in kernel.hyperparameters().items():
        # A hyperparameter never overwrites a run attribute (e.g. a kernel's own "seed").
        attrs[key if key not in attrs else f"kernel_{key}"] = value
    return attrs


def draws_to_inference_data(
    rec: Mapping[str, np.ndarray],
    st: Mapping[str, np.ndarray],
    evaluator: Evaluator,
    coords: Mapping[str, np.ndarray],
    attrs: dict[str, Any],
    backend: Backend,
    chain_ids: Sequence[int],
) -> Any:
    """The draws of one run in the layout of DESIGN.md §4, through the one public builder
    (:func:`bayes_susc.storage.draws.make_inference_data`).

    Args:
        rec: recorded observables, each (chain, draw, ...): ``phi`` and ``eval_loss``
            (nats), ``probe_loss`` (chain, draw, probe) and user observables.
        st: sample statistics, each (chain, draw).
        evaluator: gives the anchor losses at w* (``constant_data``).
        coords: per-probe labels from :func:`check_probe_coords`.
        attrs: run attributes (:func:`run_attrs`), on every group.
        backend: "inferencedata" or "datatree" (or "auto").
        chain_ids: the chain coordinate.
    """
    num_draws = rec["phi"].shape[1]
    base = {"chain": np.asarray(chain_ids), "draw": np.arange(num_draws)}
    posterior_vars = {}
    for name, value in rec.items():
        if name == "probe_loss":
            posterior_vars[name] = (("chain", "draw", "probe"), value)
        else:
            extra = tuple(f"{name}_dim_{i}" for i in range(value.ndim - 2))
            posterior_vars[name] = (("chain", "draw") + extra, value)
    probe = {"probe": np.arange(rec["probe_loss"].shape[-1])}
    probe_meta = {k: ("probe", v) for k, v in coords.items()}
    post = xr.Dataset(posterior_vars, coords={**base, **probe, **probe_meta}, attrs=attrs)
    stats = xr.Dataset({k: (("chain", "draw"), v) for k, v in st.items()}, coords=base, attrs=attrs)
    const = xr.Dataset(
        {
            "eval_loss_anchor": ((), evaluator.eval_loss_anchor.cpu().numpy()),
            "probe_loss_anchor": (("probe",), evaluator.probe_loss_anchor.cpu().numpy()),
        },
        coords={**probe, **probe_meta},
        attrs=attrs,
    )
    return make_inference_data(
        {"posterior": post, "sample_stats": stats, "constant_data": const}, backend
    )
