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
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import xarray as xr
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from bayes_susc.errors import DivergenceWarning
from bayes_susc.kernels.base import Kernel, NoiseSource, make_kernel
from bayes_susc.storage.draws import (
    Backend,
    check_backend,
    get_group,
    group_names,
    make_inference_data,
)
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
                params = posterior.functional_params(v)
                return functional_call(bound, params, (), strict=False, tie_weights=False)

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
        "keep_state",
        "resume_from",
    }
)

#: The group that holds the sampler's state after the last step (``keep_state=True``).
SAMPLER_STATE_GROUP = "sampler_state"
# Entries of the run config that do not identify the run a result can be extended from:
# its length, where its chains diverged (carried in the state), and package versions.
_NOT_IDENTITY = frozenset({"num_draws", "versions", "diverged_chains", "diverged_at_step"})


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
    keep_state: bool = False,
    resume_from: Any = None,
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
        backend: ``"inferencedata"`` (ArviZ < 1 only) or ``"datatree"``; default follows
            the installed ArviZ (see :func:`bayes_susc.storage.draws.check_backend`).
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
        keep_state: also return the sampler's state after the last step, in a group
            ``sampler_state`` (see :func:`sampler_state_dataset`), so that the run can be
            extended with ``resume_from``; :func:`bayes_susc.save` and ``load`` keep it.
            It costs one copy of the kernel state per chain (the position, plus momentum,
            thermostat or preconditioner for the kernels that have them) and the chain's
            generator state (5,056 bytes on CPU). Default ``False``: the result holds
            ``posterior``, ``sample_stats`` and ``constant_data`` only.
        resume_from: a result of this function made with ``keep_state=True`` (or one
            extended from such), in memory or loaded from a file: continue its chains by
            ``num_draws`` more kept draws from their saved kernel and generator state, and
            return the whole run (its draws, then the new ones, with ``sampler_state``).
            On CPU the result equals, bit for bit, a single run of the total length with
            the same settings (same ``chain_method``), when both run with the same torch
            build and thread count (``torch.get_num_threads()``: float reductions, and so
            the anchor losses, depend on it). Every other argument must describe
            the same run (posterior and component, kernel and hyperparameters, seed,
            chains, burn-in, thinning, chain method, dtype, device, evaluation and probe
            data, observable names); a ``ValueError`` names what differs. Not with
            ``store``. ``resume_from`` itself is never modified, so an extension that is
            interrupted can simply be run again.
        **kernel_kwargs: hyperparameters for a kernel given by name (e.g. ``step_size``).

    Returns:
        ArviZ ``InferenceData`` (or ``DataTree``) with groups ``posterior`` (``phi``,
        ``eval_loss`` (chain, draw), ``probe_loss`` (chain, draw, probe), user
        observables), ``sample_stats`` (``loss``, ``potential``, ``grad_norm``,
        ``distance``, ``diverged``, kernel statistics) and ``constant_data``
        (observables at w*), and ``sampler_state`` with ``keep_state`` or
        ``resume_from``. A chain diverges at the first step whose state or potential is
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
    backend = check_backend(backend)  # before sampling: InferenceData needs ArviZ < 1
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
    if not isinstance(keep_state, bool):
        raise TypeError(f"keep_state must be True or False, got {keep_state!r}")
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
    previous = None
    if resume_from is not None:
        if streamed is not None:
            raise ValueError(
                "resume_from cannot be combined with store: extend the run in memory, or "
                "stream a new run of the total length"
            )
        previous = _read_previous(resume_from)
        _check_same_run(previous, posterior, kernel, settings, chain_ids, evaluator, coords)
        settings["num_draws"] = previous.num_draws + num_draws
    keep_state = keep_state or previous is not None  # an extension stays extendable
    if keep_state and streamed is not None:
        raise ValueError("keep_state cannot be combined with store (not supported yet)")
    noise = NoiseSource(seeds, posterior.device, posterior.dtype)
    num_steps = num_burnin + settings["num_draws"] * steps_per_draw
    # The schedule is prefix-stable (epochs of seeded permutations), so the total run's
    # schedule starts with the previous run's: the extension reads on from first_step.
    schedule = _batch_schedule(len(posterior.train_batches), num_steps, seed)
    first_step = 0 if previous is None else previous.steps_done
    start = posterior.anchor_vector.unsqueeze(0).expand(run_chains, -1).clone()
    show = sys.stderr.isatty() if progress is None else bool(progress)
    groups_of_chains = (
        [list(range(run_chains))]
        if chain_method == "vectorized"
        else [[k] for k in range(run_chains)]
    )
    records, stats, carries = [], [], []
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
        total=(num_steps - first_step) * len(groups_of_chains),
        disable=not show,
        desc=f"{posterior.component.name} [{kernel.name}]",
        unit="step",
    ) as bar:
        for group in groups_of_chains:
            sub_noise = noise if len(group) == run_chains else noise.subset(group[0])
            sink = None  # streaming: where this group's chunks of draws go
            if writer is not None:
                sink = partial(writer.append, slice(group[0], group[-1] + 1))
            rec, st, carry = _run(
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
                resume=None if previous is None else previous.carry(group, posterior.device),
                first_step=first_step,
                keep_state=keep_state,
            )
            records.append(rec)
            stats.append(st)
            carries.append(carry)
    rec = {k: np.concatenate([r[k] for r in records], axis=0) for k in records[0]}
    st = {k: np.concatenate([s[k] for s in stats], axis=0) for k in stats[0]}
    if previous is not None:
        if set(st) != set(previous.stats) or set(rec) != set(previous.draws):
            raise ValueError(
                f"resume_from holds sample_stats {sorted(previous.stats)} and draws "
                f"{sorted(previous.draws)}; the extension made {sorted(st)} and {sorted(rec)}"
            )
        # The previous draws are kept as they are: the new ones follow along the draw axis.
        rec = {k: np.concatenate([previous.draws[k], v], axis=1) for k, v in rec.items()}
        st = {k: np.concatenate([previous.stats[k], v], axis=1) for k, v in st.items()}
    diverged_step = np.concatenate([c.diverged_at.cpu().numpy() for c in carries])
    cause = np.concatenate([c.cause.cpu().numpy() for c in carries])
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
    attrs = run_attrs(posterior, kernel, settings, diverged_step, chain_ids)
    if writer is not None:
        anchors = (evaluator.eval_loss_anchor, evaluator.probe_loss_anchor)
        writer.close(*(a.cpu().numpy() for a in anchors), attrs)
        return open_store(writer.path, backend)
    state = sampler_state_dataset(carries, num_steps, chain_ids, attrs) if keep_state else None
    return draws_to_inference_data(
        rec, st, evaluator, coords, attrs, backend, chain_ids, sampler_state=state
    )


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


# ------------------------------------------------------------------ sampler state
class _Carry(NamedTuple):
    """A group of chains between two steps: everything the next step needs."""

    names: tuple[str, ...]  # the kernel state's field names, in its order
    state: tuple[torch.Tensor, ...]  # the kernel state's fields, each (chains, ...)
    noise: list[torch.Tensor]  # each chain's generator state (CPU uint8)
    alive: torch.Tensor  # (chains,) bool
    diverged_at: torch.Tensor  # (chains,) int64: the step a chain diverged at, -1: never
    cause: torch.Tensor  # (chains,) int64: an index into _DIVERGENCE_CAUSES


def _state_names(state: Any) -> tuple[str, ...]:
    """The kernel state's field names: a NamedTuple's own, ``field_<i>`` for a tuple."""
    if hasattr(state, "_fields"):
        return tuple(state._fields)
    return tuple(f"field_{i}" for i in range(len(state)))


def _check_storable_state(kernel: Kernel, state: Any, num_chains: int) -> None:
    """Every field of the kernel state is a tensor led by the chain axis (what can be
    stored per chain and sliced by chain group); raises ``ValueError`` naming the field."""
    for name, field in zip(_state_names(state), state):
        if not isinstance(field, torch.Tensor) or field.dim() == 0 or field.shape[0] != num_chains:
            raise ValueError(
                f"kernel {kernel.name!r}: state field {name!r} is not a tensor led by the "
                f"chain axis ({num_chains} chains), so its sampler state cannot be kept or "
                "resumed (keep_state, resume_from)"
            )


def _restore_state(kernel: Kernel, fresh: Any, saved: Mapping[str, torch.Tensor]) -> Any:
    """The saved fields in a state of ``fresh``'s type (``fresh`` is ``kernel.init``'s
    output, which fixes the type, field order, shapes and dtypes the saved ones must have)."""
    names = _state_names(fresh)
    if set(names) != set(saved):
        raise ValueError(
            f"resume_from holds a kernel state with fields {sorted(saved)}, but kernel "
            f"{kernel.name!r} has {sorted(names)}"
        )
    fields = []
    for name, new in zip(names, fresh):
        old = saved[name]
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ValueError(
                f"resume_from's kernel state field {name!r} is {old.dtype} of shape "
                f"{tuple(old.shape)}; kernel {kernel.name!r} needs {new.dtype} of shape "
                f"{tuple(new.shape)}"
            )
        fields.append(old)
    return type(fresh)(*fields) if hasattr(fresh, "_fields") else type(fresh)(fields)


def sampler_state_dataset(
    carries: Sequence[_Carry], steps_done: int, chain_ids: Sequence[int], attrs: dict[str, Any]
) -> xr.Dataset:
    """The ``sampler_state`` group: each chain's state after the run's last step.

    Variables (``chain`` is the run's chain coordinate):

    - ``state_<field>`` (chain, ``state_<field>_dim_0``, ...): each field of the kernel
      state (``state_position`` (chain, dim), and e.g. ``state_momentum``,
      ``state_thermostat``, ``state_square_avg``, MALA's cached ``state_potential``,
      ``state_grad``, ``state_loss``), in the posterior's dtype (units of v);
    - ``noise_state`` (chain, noise_state_byte) uint8: ``torch.Generator.get_state()``
      of the chain's noise generator (5,056 bytes on CPU, 16 on CUDA);
    - ``alive`` (chain) bool, ``diverged_at`` (chain) int64 (step, −1: never),
      ``divergence_cause`` (chain) int64 (0: none);
    - ``steps_done`` (scalar) int64: kernel steps taken, burn-in included; the next
      step reads the batch schedule at this index.

    Plain numeric arrays, so a saved file is read back without unpickling anything.
    The run's identity is the ``bayes_susc_config`` attribute, as on every group.

    Args:
        carries: per group of chains (in chain order), the state ``_run`` returned.
        steps_done: kernel steps the run took.
        chain_ids: the chain coordinate.
        attrs: run attributes (:func:`run_attrs`).
    """
    data_vars: dict[str, Any] = {}
    for i, name in enumerate(carries[0].names):
        value = np.concatenate([c.state[i].detach().cpu().numpy() for c in carries], axis=0)
        dims = ("chain",) + tuple(f"state_{name}_dim_{j}" for j in range(value.ndim - 1))
        data_vars[f"state_{name}"] = (dims, value)
    noise = [s.cpu().numpy().astype(np.uint8) for c in carries for s in c.noise]
    data_vars["noise_state"] = (("chain", "noise_state_byte"), np.stack(noise))
    for var, field in (("alive", "alive"), ("diverged_at", "diverged_at")):
        data_vars[var] = (
            ("chain",),
            np.concatenate([getattr(c, field).cpu().numpy() for c in carries]),
        )
    data_vars["divergence_cause"] = (
        ("chain",),
        np.concatenate([c.cause.cpu().numpy() for c in carries]),
    )
    data_vars["steps_done"] = ((), np.int64(steps_done))
    return xr.Dataset(data_vars, coords={"chain": np.asarray(chain_ids)}, attrs=attrs)


class _Previous(NamedTuple):
    """What a run to be extended holds (see :func:`_read_previous`)."""

    config: dict[str, Any]  # its bayes_susc_config
    chain_ids: list[int]
    num_draws: int
    steps_done: int
    draws: dict[str, np.ndarray]  # posterior variables, (chain, draw, ...)
    stats: dict[str, np.ndarray]  # sample_stats variables, (chain, draw)
    probe_coords: dict[str, np.ndarray]
    eval_loss_anchor: np.ndarray
    probe_loss_anchor: np.ndarray
    state: xr.Dataset  # the sampler_state group

    def carry(self, group: Sequence[int], device: torch.device) -> _Carry:
        """The saved state of the chains at positions ``group`` (of this run's chains)."""
        index = np.asarray(group)
        saved = {}
        for var in self.state.data_vars:
            if str(var).startswith("state_"):
                value = np.ascontiguousarray(self.state[var].values[index])
                saved[str(var)[len("state_") :]] = torch.from_numpy(value).to(device)
        noise = [
            torch.from_numpy(np.ascontiguousarray(row, dtype=np.uint8))
            for row in self.state["noise_state"].values[index]
        ]

        def per_chain(var: str, dtype: Any) -> torch.Tensor:
            value = np.ascontiguousarray(self.state[var].values[index], dtype=dtype)
            return torch.from_numpy(value).to(device)

        alive = per_chain("alive", np.bool_)
        diverged_at = per_chain("diverged_at", np.int64)
        cause = per_chain("divergence_cause", np.int64)
        return _Carry(tuple(saved), tuple(saved.values()), noise, alive, diverged_at, cause)


def _read_previous(data: Any) -> _Previous:
    """The parts of ``resume_from`` an extension needs, checked for consistency."""
    try:
        names = group_names(data)
    except (AttributeError, TypeError):
        raise TypeError(
            "resume_from must be a result of sample(..., keep_state=True) (InferenceData or "
            f"DataTree), got {type(data).__name__}"
        ) from None
    needed = ("posterior", "sample_stats", "constant_data", SAMPLER_STATE_GROUP)
    missing = [g for g in needed if g not in names]
    if missing:
        raise ValueError(
            f"resume_from lacks the group(s) {missing}: only a result of "
            "sample(..., keep_state=True), or of an extension, can be extended"
        )
    post = get_group(data, "posterior")
    stats = get_group(data, "sample_stats")
    const = get_group(data, "constant_data")
    state = get_group(data, SAMPLER_STATE_GROUP)
    try:
        config = json.loads(post.attrs["bayes_susc_config"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("resume_from's posterior group has no valid bayes_susc_config") from None
    chain_ids = np.asarray(post["chain"].values).tolist()
    num_draws = int(post.sizes["draw"])
    steps_done = int(state["steps_done"].values)
    expected = config["num_burnin"] + num_draws * config["steps_per_draw"]
    if (
        np.asarray(state["chain"].values).tolist() != chain_ids
        or num_draws != config["num_draws"]
        or steps_done != expected
    ):
        raise ValueError(
            f"resume_from is inconsistent: {num_draws} draws of chains {chain_ids}, config "
            f"num_draws {config['num_draws']}, sampler_state of chains "
            f"{np.asarray(state['chain'].values).tolist()} after {steps_done} steps "
            f"(expected {expected})"
        )
    probe_coords = {
        str(k): np.asarray(v.values)
        for k, v in post.coords.items()
        if k != "probe" and v.dims == ("probe",)
    }
    return _Previous(
        config=config,
        chain_ids=chain_ids,
        num_draws=num_draws,
        steps_done=steps_done,
        draws={str(k): np.asarray(v.values) for k, v in post.data_vars.items()},
        stats={str(k): np.asarray(v.values) for k, v in stats.data_vars.items()},
        probe_coords=probe_coords,
        eval_loss_anchor=np.asarray(const["eval_loss_anchor"].values),
        probe_loss_anchor=np.asarray(const["probe_loss_anchor"].values),
        state=state,
    )


def _check_same_run(
    previous: _Previous,
    posterior: LocalPosterior,
    kernel: Kernel,
    settings: Mapping[str, Any],
    chain_ids: Sequence[int],
    evaluator: Evaluator,
    coords: Mapping[str, np.ndarray],
) -> None:
    """``resume_from`` is a run of these settings: else ``ValueError`` naming what differs."""
    none = np.full(len(chain_ids), -1)
    # The config this call would write, through JSON as the saved one went (tuples to lists).
    config = json.loads(
        run_attrs(posterior, kernel, dict(settings), none, chain_ids)["bayes_susc_config"]
    )
    differ = [
        f"{k} (resume_from: {previous.config.get(k)!r}, now: {config.get(k)!r})"
        for k in sorted(set(config) | set(previous.config))
        if k not in _NOT_IDENTITY and config.get(k) != previous.config.get(k)
    ]
    if list(chain_ids) != previous.chain_ids:
        differ.append(f"chains (resume_from: {previous.chain_ids}, now: {list(chain_ids)})")
    eval_anchor = evaluator.eval_loss_anchor.cpu().numpy()
    if not np.array_equal(previous.eval_loss_anchor, eval_anchor):
        differ.append(
            f"eval_data or the model (loss at w*: resume_from {previous.eval_loss_anchor}, "
            f"now {eval_anchor})"
        )
    probe_anchor = evaluator.probe_loss_anchor.cpu().numpy()
    if not np.array_equal(previous.probe_loss_anchor, probe_anchor):
        differ.append("probe_data or the model (probe losses at w* differ)")
    old_obs = sorted(set(previous.draws) - {"phi", "eval_loss", "probe_loss"})
    if old_obs != sorted(evaluator.user):
        differ.append(f"observables (resume_from: {old_obs}, now: {sorted(evaluator.user)})")
    same_coords = set(coords) == set(previous.probe_coords) and all(
        np.array_equal(v, previous.probe_coords[k]) for k, v in coords.items()
    )
    if not same_coords:
        differ.append(
            f"probe_coords (resume_from: {sorted(previous.probe_coords)}, now: {sorted(coords)})"
        )
    if differ:
        raise ValueError(
            "resume_from is not a run of these settings, so it cannot be extended: "
            + "; ".join(differ)
        )


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
    resume: _Carry | None = None,
    first_step: int = 0,
    keep_state: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], _Carry]:
    """Run one group of chains through steps ``first_step, ..., len(schedule) - 1``;
    returns the draws, step statistics and the chains' state after the last step
    (kernel state, generator states, alive, divergence step (-1: none) and divergence
    cause, an index into ``_DIVERGENCE_CAUSES``).

    With ``resume`` (the state after step ``first_step - 1``), the chains continue from
    it instead of starting at ``start``. With ``keep_state``, a kernel state that cannot
    be stored (a field that is not a tensor led by the chain axis) fails before the
    first step. With ``sink``, every ``sink_every`` kept draws (and the rest at the end)
    are handed to ``sink(draws, stats)`` as (chains, k, ...) arrays and dropped, and the
    returned draws and statistics are empty.
    """
    batches = posterior.train_batches

    def grad_for(step: int) -> Callable[[torch.Tensor], Any]:
        if kernel.full_batch:
            return posterior.full_potential_and_grad
        batch = batches[schedule[step]] if len(schedule) else batches[0]
        return lambda positions: posterior.potential_and_grad(positions, batch)

    # On resume, init still runs: it gives the state's type (and field shapes) that the
    # saved fields are checked against; the noise it may draw is undone by restoring
    # the generators afterwards.
    state = kernel.init(start, grad_for(0), noise)
    num_chains = start.shape[0]
    if keep_state or resume is not None:
        _check_storable_state(kernel, state, num_chains)
    alive = torch.ones(num_chains, dtype=torch.bool, device=start.device)
    diverged_at = torch.full((num_chains,), -1, dtype=torch.long, device=start.device)
    cause = torch.zeros(num_chains, dtype=torch.long, device=start.device)
    if resume is not None:
        state = _restore_state(kernel, state, dict(zip(resume.names, resume.state)))
        noise.set_state(resume.noise)
        alive, diverged_at, cause = resume.alive, resume.diverged_at, resume.cause
    draws: dict[str, list[torch.Tensor]] = {}
    step_stats: dict[str, list[torch.Tensor]] = {}
    since_update = 0
    for t in range(first_step, len(schedule)):
        new_state, info = kernel.step(state, grad_for(t), noise)
        if t == first_step:
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
    carry = _Carry(_state_names(state), tuple(state), noise.get_state(), alive, diverged_at, cause)
    return to_np, stats_np, carry


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
    sampler_state: xr.Dataset | None = None,
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
        backend: "inferencedata" or "datatree", or None for the installed ArviZ's own.
        chain_ids: the chain coordinate.
        sampler_state: the group of that name (:func:`sampler_state_dataset`), if any.
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
    groups = {"posterior": post, "sample_stats": stats, "constant_data": const}
    if sampler_state is not None:
        groups[SAMPLER_STATE_GROUP] = sampler_state
    return make_inference_data(groups, backend)
