"""One spec into one run folder: the only pipeline (``bayes-susc demo`` and ``run`` both use it).

:func:`run` checks the folder, takes its lock, compares the spec with the one the folder
was started with, samples the components not yet finished (each saved atomically as it
comes), builds the response matrix, saves the analyses (PCA, clusters, health verdicts,
head roles where known), writes the summary and lays out the report.

Run folder::

    .lock                  who is writing (see bayes_susc.pipeline.lock)
    run_info.json          the whole spec: components, sampling, loss, fingerprints of
                           the weights and of the data; a resume must match it
    components/<name>.nc   draws of each component (DESIGN.md §4)
    response_matrix.nc     χ, intervals, R-hat, ESS, status of every (probe, component)
    analyses/pca.nc        PCA of the response matrix (scores, loadings, variance)
    analyses/clusters.nc   k-means labels of the probes and the examples per cluster
    analyses/health.json   each component's trace checks and verdict
    stability.json         each component's stiffest curvature and the step's verdict
                           (bayes_susc.checks.stability), measured before sampling
    convergence.json       runs to a target (SamplingSettings.until): the share of
                           converged entries after each round, and how the run ended
    head_roles.nc          attention-pattern role scores (models that report them)
    summary.json           headline figures; report.html and figures/*.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bayes_susc.errors import PriorDominanceWarning, RunFolderError, StabilityWarning
from bayes_susc.pipeline.lock import run_folder_lock
from bayes_susc.pipeline.run_folder import component_summary, remove_stale_temporaries
from bayes_susc.pipeline.spec import RunSpec
from bayes_susc.storage.draws import atomic_write, to_jsonable

__all__ = [
    "SETTLED_STATUSES",
    "check_output_folder",
    "data_fingerprint",
    "run",
    "spec_record",
    "weights_fingerprint",
    "write_run_report",
]

Log = Callable[[str], None]

#: Entry statuses that are final answers: converged, no sampler failure (χ may still be
#: indistinguishable from zero).
SETTLED_STATUSES = ("ok", "ci_contains_zero", "not_significant_bh")


# ----------------------------------------------------------------------------- checks
def check_output_folder(out: Path) -> Path:
    """Create ``out`` if needed and check that results can be written there.

    Raises:
        RunFolderError: ``out`` is a file, or it (or a parent) cannot be created or
            written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"the output folder {out} is a file; give a folder (--out)")
    try:
        (out / "components").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(
            f"cannot create the output folder {out}: {exc.strerror or exc}"
        ) from None
    for folder in (out, out / "components"):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RunFolderError(f"the output folder {folder} is not writable")
    return out


def _hash_update(h: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"array{obj.shape}{obj.dtype}".encode())
        h.update(np.ascontiguousarray(obj).tobytes() if obj.dtype != object else repr(obj).encode())
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(f"key{k!s}".encode())
            _hash_update(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"seq{len(obj)}".encode())
        for item in obj:
            _hash_update(h, item)
    else:
        h.update(repr(obj).encode())


def weights_fingerprint(model: Any) -> str:
    """SHA-256 (first 16 hex digits) of every named parameter's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        _hash_update(h, p)
    return h.hexdigest()[:16]


def data_fingerprint(*data: Any) -> str:
    """SHA-256 (first 16 hex digits) of tensors, arrays, lists and dicts, by value."""
    h = hashlib.sha256()
    for item in data:
        _hash_update(h, item)
    return h.hexdigest()[:16]


def _function_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def spec_record(spec: RunSpec) -> dict[str, Any]:
    """What ``run_info.json`` records of a spec: everything the draws depend on."""
    return to_jsonable(
        {
            "name": spec.name,
            "description": dict(spec.description),
            "model": spec.model_description,
            "weights_fingerprint": weights_fingerprint(spec.model),
            "data_fingerprint": data_fingerprint(
                spec.train_data, spec.eval_data, spec.probe_data, dict(spec.probe_coords)
            ),
            "loss_fn": _function_name(spec.loss_fn),
            "sampling": spec.sampling.record(),
            "components": {
                c.name: {k: _selection_record(v) for k, v in c.selections.items()}
                for c in spec.components
            },
        }
    )


def _selection_record(selection: Any) -> Any:
    try:
        import torch

        if isinstance(selection, torch.Tensor):
            return {"mask_fingerprint": data_fingerprint(selection)}
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(selection, np.ndarray):
        return {"mask_fingerprint": data_fingerprint(selection)}
    return selection


_SHARED_KEYS = ("weights_fingerprint", "data_fingerprint", "loss_fn", "sampling")


def _differences(old: Mapping, new: Mapping, finished: Sequence[str]) -> list[str]:
    """What differs between the recorded spec and this one, for the finished components."""
    out = []
    labels = {
        "weights_fingerprint": "the model's weights",
        "data_fingerprint": "the data (train, eval or probe)",
        "loss_fn": "the loss function",
    }
    for key in _SHARED_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "sampling" and isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"sampling {k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            out.append(f"{labels[key]} ({a} -> {b})")
    old_comps = old.get("components", {})
    for name in finished:
        if name in old_comps and old_comps[name] != new["components"].get(name):
            out.append(f"the definition of component {name}")
    return out


# -------------------------------------------------------------------------------- run
def run(
    spec: RunSpec,
    out: str | Path,
    *,
    progress: bool | None = None,
    restart: bool = False,
    report: bool = True,
    log: Log | None = None,
) -> dict:
    """Run (or resume) ``spec`` into the folder ``out``; returns the summary.

    Args:
        spec: the run (:class:`~bayes_susc.pipeline.spec.RunSpec`).
        out: the run folder; made if missing.
        progress: progress bars (``None``: only when stderr is a terminal).
        restart: discard the folder's results (draws, matrix, analyses) and sample
            again, instead of refusing a folder started with another spec.
        report: lay out ``report.html`` at the end.
        log: called with one line per event worth telling (resumed components, a
            component file that could not be read); ``None``: silent.

    Returns:
        The summary (also ``summary.json``): settings, per-component headline figures,
        which components were sampled now and which reused, the matrix's shape and
        status counts, PCA variance ratios, head roles where known, the report's path.

    Raises:
        RunFolderError: the folder cannot be written, another process holds it, or it was
            started with a different spec (the message names what changed) and
            ``restart`` is False.
    """
    started = time.perf_counter()  # the time budget of a run to a target counts from here
    say = log or (lambda _msg: None)
    # Warnings the caller will see one way: through its log when it gave one, else as
    # Python warnings (a library caller without a log).
    tell = (lambda msg, _category: log(msg)) if log else _warn
    out = check_output_folder(Path(out))
    with run_folder_lock(out):
        remove_stale_temporaries(out)
        record = spec_record(spec)
        finished = _check_resume(out, spec, record, restart, say)
        record["components"] = {**_recorded_components(out, finished), **record["components"]}
        until = spec.sampling.until
        record["until"] = None if until is None else until.record()
        atomic_write(
            out / "run_info.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2))
        )
        from bayes_susc.sampling.executor import ProcessExecutor

        executor = spec.execution.make_executor()
        problem = _problem(spec)
        # Worker processes end with the run (killed at once on an error such as Ctrl-C);
        # a Ray cluster outlives it. One pool serves the checks and every round.
        owned = isinstance(executor, ProcessExecutor)
        with executor if owned else contextlib.nullcontext():
            stability = _check_stability(spec, out, tell, executor, problem)
            runs, computed, convergence = _sample(
                spec, out, finished, progress, say, started, executor, problem
            )
        return _finish(spec, out, runs, computed, report, stability, convergence)


def _component_path(out: Path, name: str) -> Path:
    return out / "components" / f"{name}.nc"


def _recorded_components(out: Path, keep: Mapping[str, Any]) -> dict:
    path = out / "run_info.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text()).get("components", {})
    return {k: v for k, v in old.items() if k in keep}


_RESULTS = (
    "response_matrix.nc",
    "summary.json",
    "report.html",
    "head_roles.nc",
    "run_info.json",
    "stability.json",
    "convergence.json",
)


def _clear_results(out: Path) -> None:
    for name in _RESULTS:
        (out / name).unlink(missing_ok=True)
    for folder in ("components", "analyses", "figures"):
        shutil.rmtree(out / folder, ignore_errors=True)
    (out / "components").mkdir()


def _check_resume(
    out: Path, spec: RunSpec, record: dict, restart: bool, say: Log
) -> dict[str, Any]:
    """Load the finished components that this spec may reuse; refuse a stale folder."""
    from bayes_susc.storage.draws import load

    on_disk = sorted(p.stem for p in (out / "components").glob("*.nc"))
    info_path = out / "run_info.json"
    if restart and (on_disk or info_path.exists()):
        say(f"--restart: discarding the results in {out}")
        _clear_results(out)
        return {}
    wanted = [c.name for c in spec.components if c.name in on_disk]
    if on_disk and not info_path.is_file():
        raise RunFolderError(
            f"run folder {out} holds component results but no run_info.json (made by an "
            "older version, or by hand), so it cannot be checked against this run. Use "
            "--restart to discard them, or another --out"
        )
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if "data_fingerprint" not in old:
            raise RunFolderError(
                f"run folder {out} was made by an older version of bayes_susc, whose "
                "run_info.json does not record the data and components, so its results "
                "cannot be checked against this run. Use --restart to discard them, or "
                "another --out"
            )
        changed = _differences(old, record, wanted)
        if changed:
            raise RunFolderError(
                f"run folder {out} was started with a different run; changed: "
                + "; ".join(changed)
                + ". Its finished results would not match. Use --restart to discard them "
                "and sample again, or another --out"
            )
    runs: dict[str, Any] = {}
    for name in wanted:
        path = _component_path(out, name)
        try:
            runs[name] = load(path)
        except Exception as exc:  # a truncated or corrupt file: netCDF/HDF5 errors vary
            say(
                f"components/{name}.nc cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); it was "
                "probably cut short by a killed write, and is sampled again"
            )
            path.unlink()
    if runs:
        say(
            f"resuming {out}: reusing {len(runs)} finished component"
            f"{'s' if len(runs) != 1 else ''} of {len(spec.components)} "
            f"({', '.join(runs)}); sampling {len(spec.components) - len(runs)}"
        )
    return runs


def _warn(message: str, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=4)


def _check_stability(
    spec: RunSpec,
    out: Path,
    tell: Callable[[str, type[Warning]], None],
    executor: Any,
    problem: Any,
) -> dict[str, dict[str, Any]]:
    """ε against each component's stiffest curvature, measured once per component and
    kept in ``stability.json`` (a resumed run reads it back); unstable ones are told."""
    from bayes_susc.checks.stability import (
        ComponentChecks,
        LangevinAcceptance,
        StabilityCheck,
        check_component,
    )

    path = out / "stability.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    kernel = spec.sampling.make_kernel()
    # A folder written before a check existed gains it on resume.
    jobs = [
        ComponentChecks(
            comp,
            spec.sampling.nbeta,
            spec.sampling.gamma,
            kernel,
            seed=spec.sampling.seed,
            acceptance_only=comp.name in known,
        )
        for comp in spec.components
        if comp.name not in known or "acceptance" not in known[comp.name]
    ]
    if jobs:
        # Side by side on the run's workers; each verdict is kept as soon as it comes.
        for job, found in zip(jobs, executor.map(check_component, problem, jobs)):
            known[job.component.name] = to_jsonable({**known.get(job.component.name, {}), **found})
            text = json.dumps(known, indent=2)
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
    for comp in spec.components:
        record = known[comp.name]
        if not record["stable"]:
            fields = {k: v for k, v in record.items() if k not in ("prior", "acceptance")}
            tell(StabilityCheck(**fields).message(comp.name), StabilityWarning)
        accept = LangevinAcceptance(
            **{k: math.nan if v is None else v for k, v in record["acceptance"].items()}
        )
        if record["stable"] and not accept.passed:
            tell(accept.message(comp.name), StabilityWarning)
    prior = {
        c.name: known[c.name]["prior"]
        for c in spec.components
        if known[c.name].get("prior", {}).get("prior_dominated")
    }
    if prior:
        message = (
            f"{len(prior)} of {len(spec.components)} components are prior-dominated: the data "
            "constrains at most "
            + ", ".join(
                f"{p['data_directions_bound']:.0f} of {p['dim']} directions ({name})"
                for name, p in list(prior.items())[:4]
            )
            + (", ..." if len(prior) > 4 else "")
            + "; their chi are small and scale like 1/gamma (raise nbeta or lower gamma to "
            "let the data speak; bayes_susc.checks.stability)"
        )
        tell(message, PriorDominanceWarning)
    return {c.name: known[c.name] for c in spec.components}


def _sample(
    spec: RunSpec,
    out: Path,
    runs: dict[str, Any],
    progress: bool | None,
    say: Log,
    started: float,
    executor: Any,
    problem: Any,
) -> tuple[dict[str, Any], list[str], dict[str, Any] | None]:
    """Sample the components not yet finished (then, with ``spec.sampling.until``, extend
    them in rounds); every result is saved as it comes. Returns the runs in the spec's
    order, the names sampled or extended now, and the convergence record (or None)."""
    todo = [c for c in spec.components if c.name not in runs]
    until = spec.sampling.until
    computed: list[str] = []
    convergence = None
    if todo or until is not None:
        rounds = _Rounds(spec, out, executor, problem, runs, computed, progress)
        first = None
        if todo:
            t0 = time.perf_counter()
            rounds.sample(todo, spec.sampling.num_draws, resume=False, note="")
            s = spec.sampling
            # A burn-in step records no observables: on the demo's heads it costs 40-50 %
            # of a step with a draw, so it counts half in the pace of later rounds.
            steps = s.num_burnin / 2 + s.num_draws * s.steps_per_draw
            first = (time.perf_counter() - t0, len(todo), steps)
        if until is not None:
            convergence = rounds.until_converged(first, say, started)
    return {c.name: runs[c.name] for c in spec.components}, computed, convergence


def _problem(spec: RunSpec) -> Any:
    from bayes_susc.sampling.executor import Problem

    return Problem(
        spec.model,
        spec.loss_fn,
        spec.train_data,
        spec.eval_data,
        spec.probe_data,
        spec.probe_coords,
    )


def _draws_per_chain(data: Any) -> int:
    from bayes_susc.storage.draws import get_group

    return int(get_group(data, "posterior").sizes["draw"])


def _extendable(data: Any) -> bool:
    from bayes_susc.sampling.driver import SAMPLER_STATE_GROUP
    from bayes_susc.storage.draws import group_names

    return SAMPLER_STATE_GROUP in group_names(data)


class _Rounds:
    """Sampling rounds of one run: each samples (or extends) some components through the
    run's executor and saves each result at once, so a killed run resumes."""

    def __init__(
        self,
        spec: RunSpec,
        out: Path,
        executor: Any,
        problem: Any,
        runs: dict[str, Any],
        computed: list[str],
        progress: bool | None,
    ) -> None:
        from bayes_susc.sampling.executor import LocalExecutor

        self.spec, self.out, self.executor, self.problem = spec, out, executor, problem
        self.runs, self.computed, self.progress = runs, computed, progress
        self.local = isinstance(executor, LocalExecutor)
        # Components run side by side on this many workers (a Ray cluster's size is not
        # known here: its rounds are timed as if on one).
        self.workers = int(getattr(executor, "workers", 1) or 1)

    def sample(self, components: Sequence[Any], num_draws: int, resume: bool, note: str) -> None:
        """Sample ``components`` for ``num_draws`` draws per chain (``resume``: extend
        their saved runs by that many) and save each as it finishes."""
        from tqdm.auto import tqdm

        from bayes_susc.sampling.executor import iter_components
        from bayes_susc.storage.draws import save

        s = self.spec.sampling
        kwargs = {**s.sample_kwargs(), "num_draws": num_draws}
        if s.until is not None:
            kwargs["keep_state"] = True  # every round can be extended by the next
        results = iter_components(
            self.problem,
            list(components),
            executor=self.executor,
            chains_per_job=self.spec.execution.chains_per_job,
            nbeta=s.nbeta,
            gamma=s.gamma,
            resume_from={c.name: self.runs[c.name] for c in components} if resume else None,
            # In this process each component shows its chains' bars; elsewhere the
            # workers' bars would only clutter their logs.
            progress=self.progress if self.local else False,
            **kwargs,
        )
        hide = True if self.local else None if self.progress is None else not self.progress
        bar = tqdm(
            results,
            total=len(components),
            desc="components" + (f" {note}" if note else ""),
            unit="comp",
            disable=hide,
        )
        for name, data in bar:
            save(data, _component_path(self.out, name))  # at once: a killed run resumes
            self.runs[name] = data
            if name not in self.computed:
                self.computed.append(name)

    def until_converged(
        self, first: tuple[float, int, float] | None, say: Log, started: float
    ) -> dict[str, Any]:
        """Extend the components in rounds until the target is met (see
        :class:`~bayes_susc.pipeline.spec.UntilConverged`); returns the convergence
        record, also written to ``convergence.json`` after every round."""
        from bayes_susc.checks.until import diagnose_entries

        spec = self.spec
        until = spec.sampling.until
        target = until.target(spec.estimation)
        path = self.out / "convergence.json"
        # Rounds of an earlier, interrupted process of this run are kept in the record.
        history = json.loads(path.read_text())["rounds"] if path.is_file() else []
        cache: dict[tuple[str, int], dict[str, Any]] = {}
        names = [c.name for c in spec.components]
        # (seconds, components, steps) of the last round this process sampled: the pace.
        pace = first
        stuck = [n for n in names if not _extendable(self.runs[n])]
        if stuck:
            say(
                f"{len(stuck)} component(s) were saved without their sampler state (a "
                f"fixed-length run: {', '.join(stuck[:4])}{', ...' if len(stuck) > 4 else ''}"
                "), so they cannot be extended; --restart samples them again"
            )
        while True:
            diag = {}
            for name in names:
                key = (name, _draws_per_chain(self.runs[name]))
                if key not in cache:
                    cache[key] = diagnose_entries(self.runs[name], target)
                diag[name] = cache[key]
            draws = {n: _draws_per_chain(self.runs[n]) for n in names}
            row = _round_row(diag, draws, time.perf_counter() - started)
            if history and history[-1]["draws_per_chain"] == draws:
                history[-1] = {**row, "round": history[-1]["round"]}  # resumed, nothing new
            else:
                history.append({**row, "round": len(history) + 1})
            say(
                f"round {history[-1]['round']}: {row['draws_per_chain_min']}-"
                f"{row['draws_per_chain_max']} draws/chain, "
                f"{100 * row['fraction_converged']:.1f}% of entries converged "
                f"(target {100 * target.fraction:g}%), {row['elapsed_seconds']:.0f} s"
            )
            below = [
                c for c in spec.components if diag[c.name]["fraction_passing"] < target.fraction
            ]
            grow = [
                c
                for c in below
                if c.name not in stuck and draws[c.name] + target.round_draws <= target.max_draws
            ]
            step = spec.sampling.steps_per_draw * target.round_draws
            if row["fraction_converged"] >= target.fraction:
                reason = "target reached"
            elif not grow:
                reason = "max_draws reached" if below else "no component can be extended"
            elif (
                target.time_budget is not None
                and pace is not None
                and (
                    time.perf_counter() - started + self._seconds(pace, len(grow), step)
                    > target.time_budget
                )
            ):
                reason = "time budget spent"
            else:
                reason = None
            record = _convergence_record(target, history, reason, diag, draws)
            text = json.dumps(record, indent=2)
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
            if reason is not None:
                if reason != "target reached":
                    say(
                        f"stopped: {reason} at {100 * row['fraction_converged']:.1f}% of "
                        f"entries converged (target {100 * target.fraction:g}%)"
                        + (
                            f"; about {record['estimated_draws_per_chain']} draws per chain "
                            "would be needed"
                            if record["estimated_draws_per_chain"]
                            else ""
                        )
                    )
                return record
            t0 = time.perf_counter()
            self.sample(
                grow,
                target.round_draws,
                resume=True,
                note=f"(round {history[-1]['round'] + 1}, "
                f"{100 * row['fraction_converged']:.1f}% converged)",
            )
            pace = (time.perf_counter() - t0, len(grow), step)

    def _seconds(self, pace: tuple[float, int, float], components: int, steps: int) -> float:
        """Wall clock of a round of ``components`` x ``steps``, at ``pace``: components
        run ``self.workers`` at a time."""
        seconds, done, done_steps = pace
        waves = math.ceil(components / self.workers) / math.ceil(done / self.workers)
        return seconds * waves * steps / done_steps


def _round_row(
    diag: Mapping[str, Mapping[str, Any]], draws: Mapping[str, int], elapsed: float
) -> dict[str, Any]:
    passing = np.concatenate([np.asarray(d["passing"]).ravel() for d in diag.values()])
    rhat = np.concatenate([np.asarray(d["rhat"]).ravel() for d in diag.values()])
    ess = np.concatenate([np.asarray(d["ess"]).ravel() for d in diag.values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: diverged components
        return {
            "draws_per_chain": dict(draws),
            "draws_per_chain_min": min(draws.values()),
            "draws_per_chain_max": max(draws.values()),
            "draws_per_chain_mean": float(np.mean(list(draws.values()))),
            "fraction_converged": float(passing.mean()) if passing.size else 0.0,
            "fraction_by_component": {
                n: round(float(d["fraction_passing"]), 5) for n, d in diag.items()
            },
            "median_rhat": float(np.nanmedian(rhat)) if np.isfinite(rhat).any() else None,
            "median_ess": float(np.nanmedian(ess)) if np.isfinite(ess).any() else None,
            "components_below_target": None,
            "elapsed_seconds": round(elapsed, 2),
        }


def _convergence_record(
    target: Any,
    history: list[dict[str, Any]],
    reason: str | None,
    diag: Mapping[str, Mapping[str, Any]],
    draws: Mapping[str, int],
) -> dict[str, Any]:
    """What ``convergence.json`` holds: the target, every round, how the run ended and,
    when short of the target, an estimate of the draws it needs (the most any component
    below the target needs, :func:`bayes_susc.checks.until.draws_needed`)."""
    from bayes_susc.checks.until import draws_needed

    below = {n: d for n, d in diag.items() if d["fraction_passing"] < target.fraction}
    history[-1]["components_below_target"] = sorted(below)
    needed = {n: draws_needed(d, draws[n], target) for n, d in below.items()}
    needed = {n: v for n, v in needed.items() if v is not None}
    return to_jsonable(
        {
            "target": {
                "fraction": target.fraction,
                "max_rhat": target.max_rhat,
                "min_ess": target.min_ess,
                "min_draws": target.min_draws,
                "round_draws": target.round_draws,
                "max_draws": target.max_draws,
                "time_budget": target.time_budget,
            },
            "rounds": history,
            "finished": reason is not None,
            "reached": reason == "target reached",
            "reason": reason,
            "fraction_converged": history[-1]["fraction_converged"],
            "draws_per_chain": dict(draws),
            "estimated_draws_per_chain": max(needed.values()) if needed else None,
        }
    )


# --------------------------------------------------------------------------- analyses
def _finish(
    spec: RunSpec,
    out: Path,
    runs: dict[str, Any],
    computed: list[str],
    report: bool,
    stability: Mapping[str, Mapping[str, Any]],
    convergence: Mapping[str, Any] | None = None,
) -> dict:
    from bayes_susc.checks.health import check_run_health
    from bayes_susc.estimation.response_matrix import (
        assign_status,
        build_response_matrix,
        save_response_matrix,
    )

    kw = spec.estimation.matrix_kwargs()
    matrix = build_response_matrix(runs, **kw)
    matrix = _with_llc(matrix, runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        health = check_run_health(runs)
    # The sampler's own verdicts fold into the status: one implementation (the checks),
    # read by assign_status through per-component flags.
    flags = {
        "unstable": (
            [not stability[name]["stable"] for name in runs],
            "the kernel's step is beyond its stability limit (bayes_susc.checks.stability)",
        ),
        "low_acceptance": (
            [not stability[name]["acceptance"]["passed"] for name in runs],
            "MALA would accept the kernel's Langevin move less often than the healthy "
            "range allows (bayes_susc.checks.stability.check_langevin_acceptance)",
        ),
        "stuck": (
            [_failed(health[name], "stuck") for name in runs],
            "a chain never moves (bayes_susc.checks.health.stuck_chains)",
        ),
        "loss_anchor": (
            [_failed(health[name], "loss_anchor") for name in runs],
            "the eval loss settled far above L(w*) (bayes_susc.checks.health)",
        ),
    }
    if any(any(values) for values, _ in flags.values()):
        order = {name: i for i, name in enumerate(runs)}
        for key, (values, description) in flags.items():
            matrix[key] = (
                "component",
                np.array([values[order[str(c)]] for c in matrix["component"].values]),
            )
            matrix[key].attrs["description"] = description
        matrix = assign_status(
            matrix,
            min_ess=kw["min_ess"],
            max_rhat=kw["max_rhat"],
            fdr=kw["fdr"],
            min_draws=kw["min_draws"],
        )
    save_response_matrix(matrix, out / "response_matrix.nc")
    analyses = _save_analyses(spec, out, matrix, health)
    patterns = _token_patterns(spec, out, matrix, runs)
    roles = _head_roles(spec, out)
    status = matrix["status"].values.ravel()
    names, counts = np.unique(status, return_counts=True)
    summary: dict[str, Any] = {
        "name": spec.name,
        "settings": dict(spec.settings_rows),
        "model": {
            "description": spec.model_description,
            "n_parameters": int(sum(p.numel() for p in spec.model.parameters())),
        },
        "components": {
            name: component_summary(d, matrix["chi"].sel(component=name))
            for name, d in runs.items()
        },
        "computed_this_run": computed,
        "reused": [n for n in runs if n not in computed],
        "stability": {name: dict(stability[name]) for name in runs},
        "response_matrix": {
            "shape": [int(n) for n in matrix["chi"].transpose("probe", "component").shape],
            "status_counts": {str(k): int(v) for k, v in zip(names, counts)},
            "settled_fraction": float(np.isin(status, SETTLED_STATUSES).mean()),
            **analyses,
        },
        "convergence": None if convergence is None else dict(convergence),
        "patterns": patterns,
    }
    if roles is not None:
        summary["head_roles"] = {
            str(c): {n: round(float(roles[n].sel(component=c)), 4) for n in roles.data_vars}
            for c in roles["component"].values
        }
    summary["report"] = str(out / "report.html") if report else None
    summary = to_jsonable(summary)
    atomic_write(
        out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    if report:
        write_run_report(out, summary)
    return summary


def write_run_report(out: Path, summary: Mapping[str, Any]) -> Path:
    """Lay out ``out/report.html``: the full report when the run saved its analyses (two
    or more estimable components), else a report of tables."""
    from bayes_susc.report.html import write_report, write_table_report

    if (out / "analyses" / "pca.nc").is_file():
        return write_report(out)
    return write_table_report(out, summary)


def _failed(report: Any, check: str) -> bool:
    return check in report and report[check].status == "fail"


def _with_llc(matrix: Any, runs: Mapping[str, Any]) -> Any:
    """The matrix with each component's restricted LLC and its interval (over
    ``component``), from the φ draws already taken."""
    from bayes_susc.estimation.llc import local_learning_coefficient

    names = [str(c) for c in matrix["component"].values]
    fits = [local_learning_coefficient(runs[name]) for name in names]
    described = {
        "llc": "restricted local learning coefficient nbeta*(<L_E(w)> - L_E(w*)) of the "
        "component (NaN when no chain kept finite draws)",
        "llc_low": "lower end of its 95% t interval (MCSE of the mean of phi)",
        "llc_high": "upper end of its 95% t interval",
    }
    for key, source in (("llc", "llc"), ("llc_low", "ci_low"), ("llc_high", "ci_high")):
        matrix[key] = ("component", np.array([float(f[source]) for f in fits]))
        matrix[key].attrs["description"] = described[key]
    return matrix


def _save_analyses(spec: RunSpec, out: Path, matrix: Any, health: Any) -> dict:
    """PCA, k-means clusters and health verdicts, saved under ``out/analyses``."""
    from bayes_susc.estimation.response_matrix import cluster, cluster_examples, pca

    folder = out / "analyses"
    shutil.rmtree(folder, ignore_errors=True)  # never lay out the analyses of another matrix
    folder.mkdir()
    table = health.table()
    health_rows = to_jsonable(
        {str(name): {str(k): v for k, v in row.items()} for name, row in table.iterrows()}
    )
    atomic_write(
        folder / "health.json", lambda tmp: Path(tmp).write_text(json.dumps(health_rows, indent=2))
    )
    a = spec.analyses
    chi = matrix["chi"].where(np.isfinite(matrix["chi"]))
    # A column of NaN (diverged) or of one value (stuck chains: χ = 0) has no variance to
    # standardize; a PCA across components needs two that vary.
    estimable = int((chi.max("probe") > chi.min("probe")).sum())
    if estimable < 2:
        return {"pca_weights": None, "explained_variance_ratio": []}
    n_pc = min(a.n_pca_components, estimable)
    # PCA on every finite entry: in a short run most entries miss R-hat <= 1.01, and a
    # fill-in model fitted to the few converged ones would then shape the components.
    # Statuses stay visible on the heat map and in the matrix.
    res = pca(matrix, n_components=n_pc, weights=None)
    k = max(1, min(a.n_clusters, int(res["used"].sum())))
    labels = cluster(res, n_clusters=k, method="kmeans", random_state=0)
    labels.name = "cluster"
    examples = cluster_examples(res, labels, k=a.n_examples)
    _write_netcdf(folder / "pca.nc", res)
    clusters = labels.to_dataset()
    clusters.attrs.update(n_clusters=k, method="kmeans", random_state=0)
    _write_netcdf(folder / "clusters.nc", clusters)
    example_rows = to_jsonable(examples.to_dict(orient="records"))
    atomic_write(
        folder / "cluster_examples.json",
        lambda tmp: Path(tmp).write_text(json.dumps(example_rows, indent=2)),
    )
    return {
        "pca_weights": "all finite entries",
        "explained_variance_ratio": [
            round(float(v), 4) for v in res["explained_variance_ratio"].values
        ],
    }


def _token_patterns(
    spec: RunSpec, out: Path, matrix: Any, runs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The probe tokens' patterns (when the spec gives the probe windows): each
    pattern's χ over components with statuses (``analyses/patterns.nc``) and its
    over-representation in each k-means cluster (``analyses/pattern_enrichment.json``);
    returns the summary's part (patterns, token counts, enriched (cluster, pattern)
    pairs)."""
    import xarray as xr

    from bayes_susc.estimation.patterns import (
        pattern_enrichment,
        pattern_matrix,
        patterns_from_coords,
    )

    windows = spec.analyses.probe_windows
    if windows is None:
        return None
    masks = patterns_from_coords(matrix, windows)
    kw = spec.estimation.matrix_kwargs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the token matrix has told its warnings already
        table = pattern_matrix(runs, masks, component_flags=matrix, **kw)
    folder = out / "analyses"
    _write_netcdf(folder / "patterns.nc", table)
    result: dict[str, Any] = {
        "num_tokens": {
            str(p): int(n) for p, n in zip(table["pattern"].values, table["num_tokens"].values)
        },
        "status_counts": {
            str(k): int(v) for k, v in zip(*np.unique(table["status"].values, return_counts=True))
        },
        "enriched": [],
    }
    clusters_path = folder / "clusters.nc"
    if clusters_path.is_file():
        with xr.open_dataset(clusters_path, engine="netcdf4") as f:
            labels = f["cluster"].load()
        # Labels over every probe of the matrix, in its order (-1: left out of the PCA).
        enrichment = pattern_enrichment(labels.values, masks, fdr=kw["fdr"])
        rows = to_jsonable(enrichment.to_dict(orient="records"))
        atomic_write(
            folder / "pattern_enrichment.json",
            lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)),
        )
        top = enrichment[enrichment["enriched"]].sort_values("q_value")
        result["enriched"] = to_jsonable(
            top[["cluster", "pattern", "count", "expected", "fold_enrichment", "q_value"]]
            .head(12)
            .to_dict(orient="records")
        )
    return result


def _write_netcdf(path: Path, ds: Any) -> None:
    atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def _head_roles(spec: RunSpec, out: Path) -> Any:
    import xarray as xr

    path = out / "head_roles.nc"
    if path.is_file():
        with xr.open_dataset(path, engine="netcdf4") as f:
            return f.load()
    if spec.analyses.head_roles is None:
        return None
    roles = spec.analyses.head_roles(spec.model)
    _write_netcdf(path, roles)
    return roles
