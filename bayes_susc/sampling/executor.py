"""Sampling many components past one process: jobs, executors, and merging chain groups.

A *job* is one (component, chain group) pair: :func:`bayes_susc.sampling.driver.sample` run for
the chains ``chains`` of a ``num_chains``-chain run of one component. Chain k's noise is
seeded from (seed, k) alone and every chain group walks the same minibatch schedule, so
the groups of a component merged by :func:`concat_chains` equal one ``sample()`` call
with all chains and the same seed:

- bit for bit with ``chain_method="sequential"`` (every chain runs alone either way);
- to float rounding with ``"vectorized"``: ``vmap`` over a different number of chains
  may round differently. Measured on CPU (tests/test_executor.py): bit for bit for a
  linear model and an attention-only transformer in groups of 1 or 2 of 4 chains; for
  an MLP's readout layer in groups of 1 chain, 1-2 float32 ulps (1.2e-7 absolute in φ
  and losses ~0.5, 3e-7 relative in the potential) after 200 draws;
- the same jobs give the same bits in this process and on Ray workers, provided each
  process holds the same problem: a factory that rebuilds it on the workers must be
  bitwise deterministic (load weights from a file rather than refit them: a LAPACK
  least-squares solve can differ in the last bit from one call to the next).

An *executor* runs jobs. It has one method, ``map(fn, shared, jobs)``, returning an
iterator over ``fn(shared, job)`` for each job, in job order:

- :class:`LocalExecutor` (the default): in this process, one job after another.
- :class:`ProcessExecutor`: a pool of worker processes on this machine (standard
  library ``concurrent.futures``, ``spawn``), each with its own torch thread count. On
  a few cores, whole jobs side by side beat intra-op threads: small per-replica
  kernels leave a second thread idle much of the time (measured on 2 cores:
  ``benchmarks/README.md``).
- :class:`RayExecutor`: one Ray task per job (``pip install 'bayes_susc[ray]'``), on a
  running cluster or a local one it starts; ``shared`` (the problem) is put in Ray's
  object store once, not shipped with every job.

The problem (model, loss, data) reaches workers as a :class:`Problem`, or as a picklable
zero-argument factory returning one (a module-level function or a
``functools.partial`` of one): a Problem is pickled once into the object store; a factory
is called on each worker process (once per process, then cached), which suits models
loaded from a checkpoint on shared disk. Ray workers import the loss function, model
class and factory by module name, so their modules must be importable on the workers
(installed, or on ``PYTHONPATH`` via Ray's ``runtime_env``).

Example::

    from bayes_susc.sampling.executor import Problem, RayExecutor, sample_components

    problem = Problem(model, loss_fn, train_batches, eval_data=e, probe_data=p)
    runs = sample_components(problem, components, executor=RayExecutor(),
                             chains_per_job=2, num_chains=8, num_draws=200, seed=0)
    runs["L0H3"]  # one InferenceData (or DataTree) holding all 8 chains
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import xarray as xr

from bayes_susc.storage.draws import get_group, group_names, make_inference_data
from bayes_susc.target.components import Component
from bayes_susc.target.posterior import LocalPosterior, LossFn, as_batch_list, resolve_free
from bayes_susc.validation import check_int

__all__ = [
    "Executor",
    "Job",
    "LocalExecutor",
    "Problem",
    "ProcessExecutor",
    "RayExecutor",
    "concat_chains",
    "iter_components",
    "make_executor",
    "plan_jobs",
    "run_job",
    "sample_components",
    "select_chains",
]

S = TypeVar("S")
J = TypeVar("J")
R = TypeVar("R")


# ------------------------------------------------------------------------------ problem
@dataclass(frozen=True)
class Problem:
    """Everything sampling needs besides the component and the settings.

    Args:
        model: the trained network (its weights are the anchor w*).
        loss_fn: ``loss_fn(model, batch) -> per-item losses`` (nats per item).
        train_data: training batches (a list, or one batch) for the minibatch gradients.
        eval_data: the evaluation set E (a batch or list of batches).
        probe_data: the probe items (a batch or list of batches).
        probe_coords: metadata per probe item, e.g. ``{"token": [...]}`` (optional).
    """

    model: Any
    loss_fn: LossFn
    train_data: Any
    eval_data: Any
    probe_data: Any
    probe_coords: Mapping[str, Sequence[Any]] | None = None


ProblemSource = Problem | Callable[[], Problem]

# One problem per worker process: jobs of one run share it, so a factory (which may load
# a model) is called once per process, not once per job. Keyed by the factory's pickle.
_CACHE: dict[str, Any] = {"key": None, "problem": None}


def _materialize(source: ProblemSource) -> Problem:
    """The Problem itself, or the factory's Problem (cached per process, see ``_CACHE``)."""
    if isinstance(source, Problem):
        return source
    try:
        key = pickle.dumps(source)
    except Exception:  # a closure or lambda: not cacheable, build it every time
        key = None
    if key is not None and key == _CACHE["key"]:
        return _CACHE["problem"]
    problem = source()
    if not isinstance(problem, Problem):
        raise TypeError(
            f"the problem factory {source!r} must return a "
            f"bayes_susc.sampling.executor.Problem, got "
            f"{type(problem).__name__}"
        )
    if key is not None:
        _CACHE.update(key=key, problem=problem)
    return problem


# --------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One (component, chain group) of a run: a small, picklable description.

    Args:
        component: the component to sample.
        chains: chain indices of the ``num_chains``-chain run to compute; ``None`` for all
            (then the job is exactly a plain ``sample()`` call).
        posterior_kwargs: ``LocalPosterior`` keywords (``nbeta``, ``gamma``).
        sample_kwargs: ``sample()`` keywords (kernel, num_chains, num_draws, seed,
            kernel hyperparameters, ...), the same for every job of a run.
        resume_from: the job's chains of an earlier result of the run, made with
            ``keep_state=True``, to extend by ``num_draws`` draws (``sample``'s
            ``resume_from``); ``None``: start the chains at w*.
    """

    component: Component
    chains: tuple[int, ...] | None
    posterior_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sample_kwargs: Mapping[str, Any] = field(default_factory=dict)
    resume_from: Any = None


@dataclass(frozen=True)
class JobResult:
    """What a job sends back: its InferenceData and the warnings it raised (category and
    message), which the driver re-raises: warnings in a worker process reach no one."""

    data: Any
    warnings: list[tuple[type[Warning], str]]


def run_job(source: ProblemSource, job: Job) -> JobResult:
    """Run one job: build the component's local posterior and sample the job's chains."""
    from bayes_susc.sampling.driver import sample

    problem = _materialize(source)
    with warnings.catch_warnings(record=True) as caught:
        # Record every warning; the driver's filters decide what to show when re-raised.
        warnings.simplefilter("always")
        posterior = LocalPosterior(
            problem.model,
            problem.loss_fn,
            problem.train_data,
            job.component,
            **job.posterior_kwargs,
        )
        data = sample(
            posterior,
            eval_data=problem.eval_data,
            probe_data=problem.probe_data,
            probe_coords=problem.probe_coords,
            chains=None if job.chains is None else list(job.chains),
            resume_from=job.resume_from,
            **job.sample_kwargs,
        )
    return JobResult(data, [(w.category, str(w.message)) for w in caught])


def plan_jobs(
    components: Sequence[Component],
    num_chains: int,
    chains_per_job: int | None,
    posterior_kwargs: Mapping[str, Any] | None = None,
    sample_kwargs: Mapping[str, Any] | None = None,
    resume_from: Mapping[str, Any] | None = None,
) -> list[Job]:
    """Split each component's ``num_chains`` chains into groups of ``chains_per_job``
    consecutive chains, one job each (``None``: one job per component, all chains).
    ``resume_from`` maps component names to earlier results to extend; each job gets
    its chains of it (:func:`select_chains`)."""
    num_chains = check_int("num_chains", num_chains, minimum=1)
    per = num_chains if chains_per_job is None else chains_per_job
    per = check_int("chains_per_job", per, minimum=1)
    if num_chains % per:
        raise ValueError(
            f"chains_per_job={per} must divide num_chains={num_chains}, so that every job "
            f"runs as many chains; divisors: "
            f"{[d for d in range(1, num_chains + 1) if num_chains % d == 0]}"
        )
    groups: list[tuple[int, ...] | None] = (
        [None]
        if per == num_chains
        else [tuple(range(s, s + per)) for s in range(0, num_chains, per)]
    )
    previous = dict(resume_from or {})

    def part(name: str, group: tuple[int, ...] | None) -> Any:
        if name not in previous:
            return None
        return previous[name] if group is None else select_chains(previous[name], group)

    return [
        Job(c, g, dict(posterior_kwargs or {}), dict(sample_kwargs or {}), part(c.name, g))
        for c in components
        for g in groups
    ]


# ---------------------------------------------------------------------------- executors
@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(shared, job)`` for every job; results come back in job order."""

    def map(self, fn: Callable[[S, J], R], shared: S, jobs: Sequence[J]) -> Iterator[R]: ...


class LocalExecutor:
    """In this process, one job after another (lazily: a job runs when its result is
    asked for, so results can be saved as they come)."""

    def map(self, fn: Callable[[S, J], R], shared: S, jobs: Sequence[J]) -> Iterator[R]:
        return (fn(shared, job) for job in list(jobs))

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Nothing to stop; lets callers write ``with executor:`` for any local one."""

    def __repr__(self) -> str:
        return "LocalExecutor()"


# Per worker process: the last shared object shipped by a ProcessExecutor, by token. A
# model that stays one object across a run's jobs keeps its per-layer prefix caches
# (bayes_susc.target.splits), so heads of one layer run in one worker share them.
_WORKER_SHARED: dict[str, Any] = {"token": None, "value": None}


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """End this worker once the process that started it is gone (killed, say): an idle
    worker waits on a queue whose other ends it holds itself, so it would wait forever."""
    while True:
        time.sleep(period_s)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(threads: int, top_pad: int | None, initializer: Callable[[], None] | None) -> None:
    import threading

    import torch

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    if top_pad is not None:
        from bayes_susc.sampling.allocator import keep_freed_memory

        keep_freed_memory(top_pad)
    if initializer is not None:
        initializer()


def _run_with_shared(fn: Callable[[Any, Any], Any], token: str, payload: bytes, job: Any) -> Any:
    if _WORKER_SHARED["token"] != token:
        # Our own pickle from the driver of this run, not a user file.
        _WORKER_SHARED.update(token=token, value=pickle.loads(payload))
    return fn(_WORKER_SHARED["value"], job)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class ProcessExecutor:
    """Jobs on a pool of worker processes on this machine.

    The pool (``concurrent.futures.ProcessPoolExecutor``, ``spawn`` start method: torch's
    threads do not survive a fork) starts at the first :meth:`map` and serves every
    later call until :meth:`shutdown` (or the end of a ``with`` block). All jobs of a
    call are submitted at once and given to whichever worker is free; results come back
    in job order, each as soon as it and the ones before it are done. ``shared`` is
    pickled once per call and unpickled once per worker, so the jobs a worker runs share
    one copy of the model. Same seeds, same numbers as :class:`LocalExecutor`.

    Workers take this process's
    :func:`bayes_susc.sampling.allocator.keep_freed_memory` setting if it
    made one (the ``bayes-susc`` command does). Workers import ``fn``, the model's class
    and the loss function by module name, as with Ray: functions defined in a script run
    as ``__main__`` reach them only if the script can be imported (the usual
    ``if __name__ == "__main__":`` guard).

    Args:
        workers: worker processes (default: ``os.cpu_count() // threads_per_worker``).
        threads_per_worker: torch intra-op threads in each worker.
        initializer: a picklable zero-argument function each worker calls once at start
            (after setting its threads), e.g. one that imports the model's heavy modules
            ahead of time or puts a folder on ``sys.path``.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int = 1,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.threads_per_worker = check_int("threads_per_worker", threads_per_worker, minimum=1)
        if workers is None:
            workers = max(1, (os.cpu_count() or 1) // self.threads_per_worker)
        self.workers = check_int("workers", workers, minimum=1)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable or None, got {initializer!r}")
        self.initializer = initializer
        self._pool: ProcessPoolExecutor | None = None

    def _ensure_pool(self) -> ProcessPoolExecutor:
        from bayes_susc.sampling.allocator import applied_top_pad

        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads_per_worker, applied_top_pad(), self.initializer),
            )
        return self._pool

    def start(self) -> float:
        """Start the worker processes now (else the first :meth:`map` does) and wait until
        every one has run its initializer; returns the seconds this took. Lets a caller
        keep interpreter start-up and imports out of what it times."""
        began = time.perf_counter()
        pool = self._ensure_pool()
        # Workers start together under spawn; a job each that waits a little lands one
        # per worker, and none can run before its worker's initializer has finished.
        seen: set[int] = set()
        for _ in range(10):
            seen |= set(pool.map(_pid_after, [0.05 * (1 + len(seen))] * self.workers))
            if len(seen) >= self.workers:
                break
        return time.perf_counter() - began

    def map(self, fn: Callable[[S, J], R], shared: S, jobs: Sequence[J]) -> Iterator[R]:
        payload = pickle.dumps(shared)  # fails here, before any job, if it cannot travel
        token = uuid.uuid4().hex
        pool = self._ensure_pool()
        futures = [pool.submit(_run_with_shared, fn, token, payload, job) for job in jobs]
        return self._results(futures)

    def _results(self, futures: list[Future]) -> Iterator[Any]:
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # abandoned or failed: drop the jobs not yet started
                future.cancel()

    def shutdown(self, *, terminate: bool = False) -> None:
        """Stop the worker processes: jobs not yet started are cancelled; running ones
        finish first, or with ``terminate`` are killed at once (what leaving a ``with``
        block on an exception, such as Ctrl-C, does: their results would be lost anyway)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if terminate:
            # concurrent.futures (before Python 3.14) cannot stop a running job itself.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.shutdown(terminate=exc_type is not None)

    def __repr__(self) -> str:
        return (
            f"ProcessExecutor(workers={self.workers}, threads_per_worker={self.threads_per_worker})"
        )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "the Ray executor needs Ray: pip install 'bayes_susc[ray]' (or 'ray>=2.9')"
        ) from exc
    return ray


class RayExecutor:
    """One Ray task per job.

    Uses the Ray cluster this process is connected to; if none, calls ``ray.init`` with
    ``address`` (``None``: start a local cluster on this machine) and ``init_kwargs``,
    without the dashboard, and :meth:`shutdown` (or leaving a ``with`` block) disconnects
    again. All jobs are submitted at once; results are returned in job order.

    Args:
        address: cluster address for ``ray.init`` (``"auto"``, ``"ray://host:10001"``,
            ...); ``None`` starts a local cluster.
        num_cpus_per_job: CPUs Ray reserves per job (Ray also sets the job's
            ``OMP_NUM_THREADS``, hence torch's thread count, from it).
        num_gpus_per_job: GPUs Ray reserves per job (the Problem's tensors must then be
            on the device the job samples on).
        runtime_env: Ray runtime environment of the jobs, e.g.
            ``{"env_vars": {"PYTHONPATH": "/shared/my_models"}}`` so that workers can
            import the modules of the model, loss and factory.
        init_kwargs: more ``ray.init`` keywords (``num_cpus``, ...), used only when this
            executor starts or connects to the cluster itself.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus_per_job: float = 1.0,
        num_gpus_per_job: float = 0.0,
        runtime_env: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._ray = _import_ray()  # fail at construction, before anything is sampled
        if not num_cpus_per_job >= 0 or not num_gpus_per_job >= 0:
            raise ValueError(
                "num_cpus_per_job and num_gpus_per_job must be >= 0, got "
                f"{num_cpus_per_job} and {num_gpus_per_job}"
            )
        self.address = address
        self.num_cpus_per_job = float(num_cpus_per_job)
        self.num_gpus_per_job = float(num_gpus_per_job)
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.init_kwargs = dict(init_kwargs or {})
        self._started = False

    def _connect(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            self._started = True

    def map(self, fn: Callable[[S, J], R], shared: S, jobs: Sequence[J]) -> Iterator[R]:
        ray = self._ray
        self._connect()
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus_per_job,
            "num_gpus": self.num_gpus_per_job,
        }
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        remote = ray.remote(**options)(fn)
        # One copy of the problem in the object store; Ray passes each task the object
        # (not the reference) because it is a top-level argument.
        shared_ref = ray.put(shared)
        futures = [remote.remote(shared_ref, job) for job in jobs]  # all submitted now
        return (ray.get(f) for f in futures)

    def shutdown(self) -> None:
        """Disconnect from Ray if this executor connected (stops a cluster it started)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"


def make_executor(executor: Executor | str | None) -> Executor:
    """An executor from ``None``/``"local"`` (in-process), ``"processes"`` (a
    :class:`ProcessExecutor`, one single-threaded worker per core), ``"ray"``, or an
    instance."""
    if executor is None or executor == "local":
        return LocalExecutor()
    if executor == "processes":
        return ProcessExecutor()
    if executor == "ray":
        return RayExecutor()
    if isinstance(executor, str):
        raise ValueError(
            f"unknown executor {executor!r}; choose 'local', 'processes' or 'ray', or pass one"
        )
    if not callable(getattr(executor, "map", None)):
        raise TypeError(
            "executor must be 'local', 'processes', 'ray' or an object with "
            f"map(fn, shared, jobs), got {executor!r}"
        )
    return executor


# ------------------------------------------------------------------------------- driver
# sample() keywords the problem or the executor supply; a caller may not pass them.
_OWNED = frozenset({"posterior", "eval_data", "probe_data", "probe_coords", "chains"})
# Streaming to one store per sample() call: the jobs of a component would share it.
_UNSUPPORTED = frozenset({"store", "chunk_draws"})


def _check_settings(
    problem: Problem,
    components: Sequence[Component],
    posterior_kwargs: Mapping[str, Any],
    sample_kwargs: Mapping[str, Any],
) -> None:
    """Everything that can be checked without sampling: keyword names, kernel and its
    hyperparameters, integer settings, each component against the model."""
    from bayes_susc.kernels.base import make_kernel
    from bayes_susc.sampling.driver import SAMPLE_KEYWORDS

    unsupported = sorted(_UNSUPPORTED & set(sample_kwargs))
    if unsupported:
        raise ValueError(
            f"sample_components does not take {unsupported}: its jobs return their draws "
            "in memory, to be merged; stream single sample() calls to a store instead"
        )
    owned = sorted(_OWNED & set(sample_kwargs))
    if owned:
        raise TypeError(
            f"sample_components sets {owned} itself (from the problem and the job plan); "
            "do not pass them"
        )
    settings = SAMPLE_KEYWORDS | {"kernel"}
    named = {k: v for k, v in sample_kwargs.items() if k in settings}
    kernel_kwargs = {k: v for k, v in sample_kwargs.items() if k not in settings}
    make_kernel(named.get("kernel", "sgld"), **kernel_kwargs)
    for key, minimum in (("num_draws", 1), ("num_burnin", 0), ("steps_per_draw", 1), ("seed", 0)):
        if key in named:
            check_int(key, named[key], minimum=minimum)
    method = named.get("chain_method", "vectorized")
    if method not in ("vectorized", "sequential"):
        raise ValueError(f"chain_method must be 'vectorized' or 'sequential', got {method!r}")
    as_batch_list("eval_data", problem.eval_data)
    as_batch_list("probe_data", problem.probe_data)
    # nβ, γ, the loss function and the training batches do not depend on the component:
    # checked once. Each job verifies its component's split itself, so not here (for a
    # model's 16 heads that check cost the driver 2.5 s before the first job started).
    LocalPosterior(
        problem.model,
        problem.loss_fn,
        problem.train_data,
        components[0],
        split=None,
        **posterior_kwargs,
    )
    for comp in components[1:]:
        resolve_free(problem.model, comp)


def iter_components(
    problem: ProblemSource,
    components: Sequence[Component],
    *,
    executor: Executor | str | None = None,
    chains_per_job: int | None = None,
    nbeta: float = 30.0,
    gamma: float = 300.0,
    resume_from: Mapping[str, Any] | None = None,
    **sample_kwargs: Any,
) -> Iterator[tuple[str, Any]]:
    """Like :func:`sample_components`, but yields ``(name, InferenceData)`` per component
    in order, as soon as all its chain groups are done (so each can be saved at once).

    ``resume_from`` maps component names to earlier results of the same run made with
    ``keep_state=True``: those components are extended by ``num_draws`` draws per chain
    from their saved state (``sample``'s ``resume_from``; the result holds the earlier
    draws and the new ones), the others start at w*. All arguments are checked, and the
    jobs submitted, when this function is called; results are collected while iterating.
    """
    if not isinstance(problem, Problem) and not callable(problem):
        raise TypeError(
            f"problem must be a Problem or a zero-argument factory returning one, got "
            f"{type(problem).__name__}"
        )
    if isinstance(components, Component):
        components = [components]
    components = list(components)
    bad = [c for c in components if not isinstance(c, Component)]
    if not components or bad:
        raise TypeError(
            f"components must be a non-empty sequence of Component, got {bad[:3] or 'none'}"
        )
    names = [c.name for c in components]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"component names must be unique (they key the results); repeated: {dup}")
    num_chains = sample_kwargs.get("num_chains", 4)
    posterior_kwargs = {"nbeta": nbeta, "gamma": gamma}
    unknown = sorted(set(resume_from or {}) - set(names))
    if unknown:
        raise ValueError(f"resume_from names components that are not sampled here: {unknown}")
    jobs = plan_jobs(
        components, num_chains, chains_per_job, posterior_kwargs, sample_kwargs, resume_from
    )
    runner = make_executor(executor)
    # The driver builds the problem once to check everything before any job starts.
    built = _materialize(problem)
    _check_settings(built, components, posterior_kwargs, sample_kwargs)
    # In-process, the built problem is reused; elsewhere, ship what the caller gave (a
    # factory rebuilds on each worker, a Problem is pickled once).
    shared = built if isinstance(runner, LocalExecutor) else problem
    results = runner.map(run_job, shared, jobs)
    per_component = len(jobs) // len(components)
    return _collect(components, results, per_component)


def _collect(
    components: Sequence[Component], results: Iterator[JobResult], per_component: int
) -> Iterator[tuple[str, Any]]:
    for comp in components:
        parts = []
        for _ in range(per_component):
            res = next(results)
            for category, message in res.warnings:
                warnings.warn(message, category, stacklevel=3)
            parts.append(res.data)
        yield comp.name, parts[0] if len(parts) == 1 else concat_chains(parts)


def sample_components(
    problem: ProblemSource,
    components: Sequence[Component],
    *,
    executor: Executor | str | None = None,
    chains_per_job: int | None = None,
    nbeta: float = 30.0,
    gamma: float = 300.0,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """Sample every component, its chains split into jobs run by ``executor``.

    Args:
        problem: a :class:`Problem`, or a picklable zero-argument factory returning one.
        components: the components (unique names).
        executor: ``None`` or ``"local"`` (in-process), ``"processes"`` (a
            :class:`ProcessExecutor` with defaults), ``"ray"`` (a :class:`RayExecutor`
            with defaults), or an executor instance.
        chains_per_job: chains per job; must divide ``num_chains``. ``None``: one job per
            component with all its chains.
        nbeta: the local posterior's nβ (:class:`LocalPosterior`).
        gamma: the local posterior's γ.
        **sample_kwargs: :func:`bayes_susc.sampling.driver.sample` keywords (``kernel``,
            ``num_chains``, ``num_draws``, ``seed``, kernel hyperparameters, ...), except
            those the problem supplies (data, probe coordinates) and ``chains``.

    Returns:
        ``{component name: InferenceData (or DataTree)}`` in the order of
        ``components``, each holding all ``num_chains`` chains: the numbers of one
        ``sample()`` call with the same settings (to float rounding, see module docs).

    Raises:
        TypeError, ValueError: bad executor, ``chains_per_job``, components, sampling
            settings or problem, before any job runs.
        ImportError: ``executor="ray"`` without Ray installed.
    """
    return dict(
        iter_components(
            problem,
            components,
            executor=executor,
            chains_per_job=chains_per_job,
            nbeta=nbeta,
            gamma=gamma,
            **sample_kwargs,
        )
    )


# ------------------------------------------------------------------------------ merging
# Run settings that describe the chains a result holds; everything else in the run's
# config must agree between the parts of one run.
_PER_CHAIN = ("chains", "chain_seeds", "diverged_chains", "diverged_at_step")
# Top-level attrs that may differ between parts (recomputed or taken from the last part).
_VARYING_ATTRS = ("created_at", "bayes_susc_config", "num_diverged_chains")


def select_chains(data: Any, chains: Sequence[int]) -> Any:
    """The part of a ``sample()`` result that holds only ``chains`` (chain indices of
    the run): the inverse of :func:`concat_chains`. Groups with a ``chain`` dimension
    are subset; the attrs are those ``sample(..., chains=chains)`` writes, so the part
    can be extended with ``resume_from`` by a job that computes these chains.

    Raises:
        ValueError: a chain the result does not hold, or a repeated one.
    """
    post = get_group(data, "posterior")
    held = np.asarray(post["chain"].values).tolist()
    chains = [int(k) for k in chains]
    if len(set(chains)) != len(chains) or not set(chains) <= set(held):
        raise ValueError(f"chains must be distinct chains of the result {held}, got {chains}")
    config = json.loads(post.attrs["bayes_susc_config"])
    where = [held.index(k) for k in chains]
    steps = [config["diverged_at_step"][i] for i in where]
    config["chain_seeds"] = [config["chain_seeds"][i] for i in where]
    config["diverged_at_step"] = steps
    config["diverged_chains"] = [k for k, s in zip(chains, steps) if s >= 0]
    if chains == list(range(config["num_chains"])):
        config.pop("chains", None)
    else:
        config["chains"] = chains
    attrs = dict(post.attrs)
    attrs["bayes_susc_config"] = json.dumps(config)
    attrs["num_diverged_chains"] = len(config["diverged_chains"])
    groups = {}
    for name in group_names(data):
        ds = get_group(data, name)
        if "chain" in ds.dims:
            ds = ds.sel(chain=chains)
        ds = ds.copy()
        ds.attrs = dict(attrs) if ds.attrs else {}
        groups[name] = ds
    backend = "datatree" if isinstance(data, xr.DataTree) else "inferencedata"
    return make_inference_data(groups, backend)


def concat_chains(parts: Sequence[Any]) -> Any:
    """Merge results of disjoint chain groups of one run into one result.

    ``parts`` are ``sample()`` results of the same component, settings and seed, each for
    some ``chains`` of a ``num_chains``-chain run. Groups with a ``chain`` dimension
    (``posterior``, ``sample_stats``) are concatenated along it, in chain order; the
    others (``constant_data``) must agree and are kept once. The attrs describe the merged
    run: ``chain_seeds``, ``diverged_chains``, ``diverged_at_step`` and
    ``num_diverged_chains`` cover all chains, and ``chains`` is dropped when the parts
    cover all ``num_chains`` chains, so the attrs match a single ``sample()`` call's.
    ``created_at`` is the latest part's.

    Raises:
        ValueError: parts of different runs (settings, draws, probes or anchor values
            differ) or overlapping chains.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concat_chains needs at least one part")
    groups = group_names(parts[0])
    for p in parts[1:]:
        if sorted(group_names(p)) != sorted(groups):
            raise ValueError(
                f"parts hold different groups: {sorted(groups)} vs {sorted(group_names(p))}"
            )
    configs = [json.loads(get_group(p, "posterior").attrs["bayes_susc_config"]) for p in parts]
    chain_ids = [np.asarray(get_group(p, "posterior")["chain"].values).tolist() for p in parts]
    flat = [k for ids in chain_ids for k in ids]
    if len(set(flat)) != len(flat):
        raise ValueError(f"parts overlap in chains: {chain_ids}")
    for i, cfg in enumerate(configs[1:], start=1):
        diff = sorted(
            k
            for k in set(cfg) | set(configs[0])
            if k not in _PER_CHAIN and cfg.get(k) != configs[0].get(k)
        )
        if diff:
            raise ValueError(f"part {i} is not from the same run as part 0: {diff} differ")
    attrs = _merged_attrs(parts, configs, chain_ids)
    merged = {}
    for name in groups:
        datasets = [get_group(p, name) for p in parts]
        if "chain" in datasets[0].dims:
            try:
                ds = xr.concat(
                    datasets,
                    dim="chain",
                    data_vars="minimal",
                    coords="minimal",
                    compat="equals",
                    join="exact",
                    combine_attrs="drop",
                )
            except ValueError as exc:
                raise ValueError(f"group {name!r} of the parts does not line up: {exc}") from None
            ds = ds.sortby("chain")
        else:
            ds = datasets[0]
            for i, other in enumerate(datasets[1:], start=1):
                if not other.equals(ds):
                    raise ValueError(
                        f"group {name!r} differs between part 0 and part {i}: not the same "
                        "problem (model, data) or not the same run"
                    )
            ds = ds.copy()
        ds.attrs = dict(attrs) if datasets[0].attrs else {}
        merged[name] = ds
    backend = "datatree" if isinstance(parts[0], xr.DataTree) else "inferencedata"
    return make_inference_data(merged, backend)


def _merged_attrs(
    parts: Sequence[Any], configs: Sequence[dict], chain_ids: Sequence[list[int]]
) -> dict[str, Any]:
    """Attrs of the merged run (see :func:`concat_chains`)."""
    first = dict(get_group(parts[0], "posterior").attrs)
    for i, p in enumerate(parts[1:], start=1):
        other = get_group(p, "posterior").attrs
        diff = sorted(
            k
            for k in set(first) | set(other)
            if k not in _VARYING_ATTRS and not _same(first.get(k), other.get(k))
        )
        if diff:
            raise ValueError(f"part {i} is not from the same run as part 0: attrs {diff} differ")
    seeds, steps = {}, {}
    for cfg, ids in zip(configs, chain_ids):
        seeds.update(zip(ids, cfg["chain_seeds"]))
        steps.update(zip(ids, cfg["diverged_at_step"]))
    order = sorted(seeds)
    config = dict(configs[0])
    config["chain_seeds"] = [seeds[k] for k in order]
    config["diverged_at_step"] = [steps[k] for k in order]
    config["diverged_chains"] = [k for k in order if steps[k] >= 0]
    if order == list(range(config["num_chains"])):
        config.pop("chains", None)
    else:
        config["chains"] = order
    attrs = dict(first)
    attrs["created_at"] = max(str(get_group(p, "posterior").attrs["created_at"]) for p in parts)
    # Same key order as sample() writes, so the JSON text matches a single run's.
    attrs["bayes_susc_config"] = json.dumps(config)
    attrs["num_diverged_chains"] = len(config["diverged_chains"])
    return attrs


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b
