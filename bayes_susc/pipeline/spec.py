"""A run, described once: what to sample, how, how to estimate, where the jobs run.

Every setting is a frozen dataclass checked when it is made, so a bad value fails
before any sampling, whichever way the run was described (``bayes-susc demo``'s preset,
a TOML config, or Python). The kernel is built once, here, from its name and
hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bayes_susc.validation import check_int

__all__ = [
    "AnalysisSettings",
    "EstimationSettings",
    "ExecutionSettings",
    "RunSpec",
    "SamplingSettings",
    "UntilConverged",
]


@dataclass(frozen=True)
class UntilConverged:
    """Sample in rounds until the response matrix converges, instead of a fixed length.

    The first round samples every component for ``SamplingSettings.num_draws`` kept
    draws per chain; each later round extends, from the saved sampler state, every
    component whose share of converged entries is below ``fraction`` by
    ``round_draws`` draws per chain (bit for bit the draws one longer run would give).
    An entry is converged when it passes the response matrix's own R-hat, ESS and
    pooled-draws thresholds (:class:`EstimationSettings`), so "converged" here means
    what the statuses mean. The run stops when at least ``fraction`` of all entries
    pass, when no component may grow past ``max_draws``, or when the next round would
    end after ``time_budget`` seconds.

    Attributes:
        fraction: share of all (probe, component) entries that must pass, in (0, 1].
        round_draws: kept draws per chain added to a component per round (≥ 1).
        max_draws: most kept draws per chain of any component (≥ ``num_draws``).
        time_budget: wall-clock seconds from the start of the run (its checks before
            sampling included) within which the last round must end, at the pace of
            the round before it; ``None``: no limit. The first round always runs; a
            resumed run starts a new budget.
    """

    fraction: float = 0.99
    round_draws: int = 100
    max_draws: int = 2000
    time_budget: float | None = None

    def __post_init__(self) -> None:
        # Target checks every value (and names the field); the thresholds come later,
        # from the estimation settings.
        target = self.target(EstimationSettings())
        for key in ("fraction", "round_draws", "max_draws", "time_budget"):
            object.__setattr__(self, key, getattr(target, key))

    def target(self, estimation: EstimationSettings) -> Any:
        """The stopping rule with ``estimation``'s thresholds
        (:class:`bayes_susc.checks.until.Target`)."""
        from bayes_susc.checks.until import Target

        return Target(
            max_rhat=estimation.max_rhat,
            min_ess=estimation.min_ess,
            min_draws=estimation.min_draws,
            fraction=self.fraction,
            round_draws=self.round_draws,
            max_draws=self.max_draws,
            time_budget=self.time_budget,
        )

    def record(self) -> dict[str, Any]:
        """JSON-able record (``run_info.json``); not compared on resume, since the draws
        of every round do not depend on it."""
        return {
            "fraction": self.fraction,
            "round_draws": self.round_draws,
            "max_draws": self.max_draws,
            "time_budget": self.time_budget,
        }


@dataclass(frozen=True)
class SamplingSettings:
    """How each component's local posterior is sampled.

    Attributes:
        kernel: a registered kernel name (``"sgld"``, ``"psgld"``, ``"sghmc"``, ...).
        hyperparameters: the kernel's own settings, ``step_size`` among them (units of
            the kernel's parameterization; for SGLD, the Langevin step ε).
        nbeta: inverse temperature times the training-set size, nβ > 0.
        gamma: localization strength γ ≥ 0 (nats per squared weight unit).
        num_chains, num_draws, num_burnin, steps_per_draw: chains per component, kept
            draws per chain, discarded steps before the first kept draw, kernel steps
            between kept draws.
        seed: master seed of every chain's noise and minibatch order.
        chain_method: ``"vectorized"`` (one ``vmap``'d call) or ``"sequential"``.
        until: sample in rounds to a convergence target (:class:`UntilConverged`;
            ``num_draws`` is then the first round's length), or ``None`` for exactly
            ``num_draws`` draws per chain.
    """

    kernel: str = "sgld"
    hyperparameters: Mapping[str, Any] = field(default_factory=lambda: {"step_size": 1e-3})
    nbeta: float = 30.0
    gamma: float = 300.0
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 100
    steps_per_draw: int = 1
    seed: int = 0
    chain_method: Literal["vectorized", "sequential"] = "vectorized"
    until: UntilConverged | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        if self.until is not None:
            if not isinstance(self.until, UntilConverged):
                raise TypeError(
                    f"until must be an UntilConverged or None, got {type(self.until).__name__}"
                )
            if self.until.max_draws < self.num_draws:
                raise ValueError(
                    f"until.max_draws ({self.until.max_draws}) must be at least num_draws "
                    f"({self.num_draws}), the first round's draws per chain"
                )
        check_int("num_chains", self.num_chains, minimum=1)
        check_int("num_draws", self.num_draws, minimum=1)
        check_int("num_burnin", self.num_burnin, minimum=0)
        check_int("steps_per_draw", self.steps_per_draw, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if not (isinstance(self.nbeta, int | float) and math.isfinite(self.nbeta)) or (
            self.nbeta <= 0
        ):
            raise ValueError(f"nbeta must be a finite number > 0, got {self.nbeta!r}")
        if not (isinstance(self.gamma, int | float) and math.isfinite(self.gamma)) or (
            self.gamma < 0
        ):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.chain_method not in ("vectorized", "sequential"):
            raise ValueError(
                f"chain_method must be 'vectorized' or 'sequential', got {self.chain_method!r}"
            )
        try:
            self.make_kernel()
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"kernel {self.kernel!r}: {exc}") from None

    def make_kernel(self) -> Any:
        """The kernel, built from its name and hyperparameters (the one place it is)."""
        from bayes_susc.kernels.base import make_kernel

        return make_kernel(self.kernel, **self.hyperparameters)

    def sample_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`bayes_susc.sampling.executor.iter_components` (besides nβ, γ):
        the built kernel and the run settings, no hyperparameter loose."""
        return {
            "kernel": self.make_kernel(),
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "num_burnin": self.num_burnin,
            "steps_per_draw": self.steps_per_draw,
            "seed": self.seed,
            "chain_method": self.chain_method,
        }

    def record(self) -> dict[str, Any]:
        """A JSON-able record (run_info.json): compared field by field on resume."""
        return {
            "kernel": self.kernel,
            **{f"kernel.{k}": v for k, v in sorted(self.hyperparameters.items())},
            "nbeta": float(self.nbeta),
            "gamma": float(self.gamma),
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "num_burnin": self.num_burnin,
            "steps_per_draw": self.steps_per_draw,
            "seed": self.seed,
            "chain_method": self.chain_method,
        }


@dataclass(frozen=True)
class EstimationSettings:
    """How χ, its interval and each entry's status are estimated from the draws
    (:func:`bayes_susc.estimation.response_matrix.build_response_matrix`).

    Attributes:
        method: interval method of :mod:`bayes_susc.estimation.susceptibility`.
        confidence: interval coverage, in (0, 1).
        min_ess, max_rhat, fdr: status thresholds (ESS in draws, R-hat, false-discovery rate).
        min_draws: fewest kept draws pooled over a component's chains for an entry to
            pass the ``ess`` check (the coverage study's 4 × 200).
        n_resamples: bootstrap resamples (bootstrap methods).
        block_length: block bootstrap length in draws; ``None``: chosen from the data.
        seed: resampling seed.
    """

    method: str = "ess_t"
    confidence: float = 0.95
    min_ess: float = 100.0
    max_rhat: float = 1.01
    fdr: float = 0.05
    min_draws: int = 800
    n_resamples: int = 1000
    block_length: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from bayes_susc.estimation.response_matrix import check_thresholds
        from bayes_susc.estimation.susceptibility import validate_settings

        validate_settings(self.method, self.confidence, self.n_resamples, self.seed)
        check_thresholds(self.min_ess, self.max_rhat, self.fdr, self.min_draws)
        if self.block_length is not None and not self.block_length > 0:
            raise ValueError(f"block_length must be > 0, got {self.block_length}")

    def matrix_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`~bayes_susc.estimation.response_matrix.build_response_matrix`."""
        return {
            "min_ess": self.min_ess,
            "max_rhat": self.max_rhat,
            "fdr": self.fdr,
            "min_draws": self.min_draws,
            "method": self.method,
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "block_length": self.block_length,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ExecutionSettings:
    """Where the sampling jobs run; results do not depend on it.

    Attributes:
        executor: ``"local"`` (this process), ``"processes"`` (worker processes on this
            machine) or ``"ray"``.
        chains_per_job: chains per job, dividing ``num_chains`` (``None``: all).
        workers, threads_per_worker: worker processes and torch threads in each
            (``"processes"`` only; ``None``: cores // threads).
        address: a running Ray cluster (``"ray"`` only; ``None``: start a local one).
        python_path: folders the workers need on their path to import the model's and
            the loss's modules.
    """

    executor: Literal["local", "processes", "ray"] = "local"
    chains_per_job: int | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    address: str | None = None
    python_path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.executor not in ("local", "processes", "ray"):
            raise ValueError(
                f"executor must be 'local', 'processes' or 'ray', got {self.executor!r}"
            )
        for key in ("chains_per_job", "workers", "threads_per_worker"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), minimum=1)
        object.__setattr__(self, "python_path", tuple(map(str, self.python_path)))

    def make_executor(self) -> Any:
        """The executor these settings describe (:mod:`bayes_susc.sampling.executor`)."""
        import functools
        import os

        from bayes_susc.sampling.executor import LocalExecutor, ProcessExecutor, RayExecutor

        if self.executor == "local":
            return LocalExecutor()
        if self.executor == "processes":
            return ProcessExecutor(
                self.workers,
                threads_per_worker=self.threads_per_worker or 1,
                initializer=(
                    functools.partial(_prepend_to_path, self.python_path)
                    if self.python_path
                    else None
                ),
            )
        # Workers unpickle the model and loss by module name: give them the folders.
        env = (
            {"env_vars": {"PYTHONPATH": os.pathsep.join(self.python_path)}}
            if self.python_path
            else None
        )
        return RayExecutor(self.address, runtime_env=env)


def _prepend_to_path(folders: tuple[str, ...]) -> None:
    """A worker process's start: the run's ``python_path`` folders on ``sys.path``."""
    import sys

    sys.path[:0] = [f for f in folders if f not in sys.path]


@dataclass(frozen=True)
class AnalysisSettings:
    """What the run computes from the response matrix and saves beside it.

    Attributes:
        n_pca_components: principal components kept (at most the number of components).
        n_clusters: k-means clusters of the probes' PCA scores.
        n_examples: probes listed per cluster (those nearest its centroid).
        head_roles: ``model -> xarray.Dataset`` of attention-pattern role scores over
            ``component`` (:mod:`bayes_susc.checks.head_roles`), or ``None`` where the
            model's roles are not known.
        probe_windows: the token strings of every probe window, position 0 included,
            indexed by the probe coordinate ``sequence`` (the probes also need
            ``position`` and ``dataset``, ``'code'``/``'prose'``): the run then assigns
            the probe tokens to patterns and saves the patterns' χ and their enrichment
            in the clusters (:mod:`bayes_susc.estimation.patterns`); ``None``: no
            patterns.
    """

    n_pca_components: int = 3
    n_clusters: int = 4
    n_examples: int = 5
    head_roles: Callable[[Any], Any] | None = None
    probe_windows: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.probe_windows is not None:
            object.__setattr__(
                self,
                "probe_windows",
                tuple(tuple(str(t) for t in window) for window in self.probe_windows),
            )
        check_int("n_pca_components", self.n_pca_components, minimum=1)
        check_int("n_clusters", self.n_clusters, minimum=1)
        check_int("n_examples", self.n_examples, minimum=1)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, built and checked; nothing sampled yet.

    Attributes:
        name: the run's name (report title, summary).
        model: the trained network; its weights are the anchor w*.
        model_description: one line saying what the model is (report, summary).
        loss_fn: ``loss_fn(model, batch) -> per-item losses`` (nats).
        train_data: training batches (the SGLD gradients).
        eval_data: the evaluation set E of φ.
        probe_data: probe items; every element of ``loss_fn``'s output is one probe.
        probe_coords: labels per probe item (e.g. ``token``, ``dataset``), each of length
            the number of probe items.
        components: what to sample, in the order of the response matrix's columns.
        sampling, estimation, execution, analyses: the settings above.
        description: JSON-able settings as the user gave them (demo settings or the
            validated config), recorded in ``run_info.json`` and shown in the report.
        settings_rows: the report's settings table (name → value).
    """

    name: str
    model: Any
    model_description: str
    loss_fn: Callable[..., Any]
    train_data: Any
    eval_data: Any
    probe_data: Any
    probe_coords: Mapping[str, Sequence[Any]]
    components: tuple[Any, ...]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    estimation: EstimationSettings = field(default_factory=EstimationSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    analyses: AnalysisSettings = field(default_factory=AnalysisSettings)
    description: Mapping[str, Any] = field(default_factory=dict)
    settings_rows: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from bayes_susc.target.components import Component

        object.__setattr__(self, "components", tuple(self.components))
        bad = [c for c in self.components if not isinstance(c, Component)]
        if not self.components or bad:
            raise TypeError(
                f"components must be a non-empty sequence of Component, got {bad[:3] or 'none'}"
            )
        names = [c.name for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"component names must be unique (they name files); repeated: {dup}")
        unsafe = [
            n for n in names if not n or n.startswith(".") or any(ch in n for ch in '/\\:*?"<>|')
        ]
        if unsafe:
            raise ValueError(f"component names {unsafe} cannot be file names; rename them")
        for key, value in (
            ("sampling", SamplingSettings),
            ("estimation", EstimationSettings),
            ("execution", ExecutionSettings),
            ("analyses", AnalysisSettings),
        ):
            if not isinstance(getattr(self, key), value):
                raise TypeError(f"{key} must be a {value.__name__}")
        if self.execution.chains_per_job is not None and (
            self.sampling.num_chains % self.execution.chains_per_job
        ):
            raise ValueError(
                f"chains_per_job = {self.execution.chains_per_job} must divide num_chains = "
                f"{self.sampling.num_chains}"
            )
