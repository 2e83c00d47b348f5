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
    "check_output_folder",
    "data_fingerprint",
    "run",
    "spec_record",
    "weights_fingerprint",
    "write_run_report",
]

Log = Callable[[str], None]


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
        atomic_write(
            out / "run_info.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2))
        )
        stability = _check_stability(spec, out, tell)
        runs, computed = _sample(spec, out, finished, progress, say)
        return _finish(spec, out, runs, computed, report, stability)


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
    spec: RunSpec, out: Path, tell: Callable[[str, type[Warning]], None]
) -> dict[str, dict[str, Any]]:
    """ε against each component's stiffest curvature, measured once per component and
    kept in ``stability.json`` (a resumed run reads it back); unstable ones are told."""
    from bayes_susc.checks.stability import (
        LangevinAcceptance,
        StabilityCheck,
        check_langevin_acceptance,
        check_prior_dominance,
        check_stability,
    )
    from bayes_susc.target.posterior import LocalPosterior

    path = out / "stability.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    kernel = spec.sampling.make_kernel()
    seed = spec.sampling.seed
    for comp in spec.components:
        # A folder written before a check existed gains it on resume.
        if comp.name not in known or "acceptance" not in known[comp.name]:
            posterior = LocalPosterior(
                spec.model,
                spec.loss_fn,
                spec.train_data,
                comp,
                nbeta=spec.sampling.nbeta,
                gamma=spec.sampling.gamma,
            )
            record = known.get(comp.name)
            if record is None:
                record = check_stability(posterior, kernel, seed=seed).to_dict()
                record["prior"] = check_prior_dominance(posterior, seed=seed).to_dict()
            accept = check_langevin_acceptance(posterior, kernel, seed=seed)
            record["acceptance"] = accept.to_dict()
            known[comp.name] = to_jsonable(record)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=2)))
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
    spec: RunSpec, out: Path, runs: dict[str, Any], progress: bool | None, say: Log
) -> tuple[dict[str, Any], list[str]]:
    from bayes_susc.storage.draws import save

    todo = [c for c in spec.components if c.name not in runs]
    computed: list[str] = []
    if todo:
        from tqdm.auto import tqdm

        from bayes_susc.sampling.executor import (
            LocalExecutor,
            Problem,
            ProcessExecutor,
            iter_components,
        )

        problem = Problem(
            spec.model,
            spec.loss_fn,
            spec.train_data,
            spec.eval_data,
            spec.probe_data,
            spec.probe_coords,
        )
        executor = spec.execution.make_executor()
        local = isinstance(executor, LocalExecutor)
        s = spec.sampling
        # Worker processes end with the run (killed at once on an error such as Ctrl-C);
        # a Ray cluster outlives it.
        owned = isinstance(executor, ProcessExecutor)
        with executor if owned else contextlib.nullcontext():
            results = iter_components(
                problem,
                todo,
                executor=executor,
                chains_per_job=spec.execution.chains_per_job,
                nbeta=s.nbeta,
                gamma=s.gamma,
                # In this process each component shows its chains' bars; elsewhere the
                # workers' bars would only clutter their logs.
                progress=progress if local else False,
                **s.sample_kwargs(),
            )
            hide = True if local else None if progress is None else not progress
            bar = tqdm(results, total=len(todo), desc="components", unit="comp", disable=hide)
            for name, data in bar:
                save(data, _component_path(out, name))  # at once: a killed run resumes
                runs[name] = data
                computed.append(name)
    return {c.name: runs[c.name] for c in spec.components}, computed


# --------------------------------------------------------------------------- analyses
def _finish(
    spec: RunSpec,
    out: Path,
    runs: dict[str, Any],
    computed: list[str],
    report: bool,
    stability: Mapping[str, Mapping[str, Any]],
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
            **analyses,
        },
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
