"""The ``bayes-susc`` command line: every command is here; the library imports no typer.

Only typer is imported up front, so ``bayes-susc --help`` answers at once; each command
imports what it runs. An error the user can fix (:class:`bayes_susc.errors.UserError`:
a config, a folder, a device, a missing extra) is printed without a traceback and exits
with code 2; Ctrl-C says which components were kept and how to resume (exit 130).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, help="Bayesian susceptibilities of network components.")

_RESTART_HELP = (
    "Discard the folder's results and sample again, instead of refusing a folder "
    "that was started with other settings, weights, data or components."
)


def _until_option(default: str) -> Any:
    """The ``--until-converged/--fixed-length`` option; ``default`` says what applies
    without it."""
    return Annotated[
        bool | None,
        typer.Option(
            "--until-converged/--fixed-length",
            help="Extend the chains in rounds until 99% of the response matrix's entries "
            "pass R-hat, ESS and draw checks (or --budget is spent), or sample exactly "
            f"--draws. Default: {default}",
            show_default=False,
        ),
    ]


def _budget_option(default: str) -> Any:
    """The ``--budget`` option; ``default`` says what applies without it."""
    return Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Seconds of wall clock from the start within which the last round must "
            f"end (implies --until-converged). Default: {default}",
            show_default=False,
        ),
    ]


_Draws = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Kept draws per chain: the whole run (fixed length), or its first round "
        "with --until-converged.",
    ),
]
_UntilDemo = _until_option("--until-converged, unless --draws is given.")
_UntilRun = _until_option("the config's [until] table.")
_BudgetDemo = _budget_option("480 (on 2 cores the demo reaches its target after 5 to 6 minutes).")
_BudgetRun = _budget_option("the config's [until.time_budget].")


@app.callback()
def main() -> None:
    """Bayesian susceptibilities of network components, with honest uncertainty."""
    from bayes_susc.sampling.allocator import keep_freed_memory

    # The command owns its process: keep freed activations instead of faulting them in
    # again every step (see bayes_susc.sampling.allocator).
    keep_freed_memory()


def _say(message: str) -> None:
    typer.echo(message, err=True)


@contextlib.contextmanager
def _user_errors(out: Path | None = None) -> Iterator[None]:
    """Print a user error without a traceback (exit 2); on Ctrl-C, say what was kept."""
    from bayes_susc.errors import UserError

    try:
        yield
    except UserError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        kept = sorted(p.stem for p in (out / "components").glob("*.nc")) if out else []
        where = f" in {out / 'components'}" if out else ""
        _say(
            f"\ninterrupted. Kept {len(kept)} finished component"
            f"{'s' if len(kept) != 1 else ''}{where}"
            + (f": {', '.join(kept)}" if kept else "")
            + f". Run the same command again to resume:\n  {_command_line()}"
        )
        raise typer.Exit(code=130) from None


def _command_line() -> str:
    args = [a for a in sys.argv[1:] if a != "--restart"]
    return shlex.join(["bayes-susc", *args])


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (resumed if it exists).")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for a smoke test.")] = False,
    preset: Annotated[
        str,
        typer.Option(
            help="'measured': the kernel the demo-heads study names (SGNHT), sampled to "
            "a convergence target; 'published': the papers' SGLD setting (eps 1e-3, "
            "4 chains x 200 draws, fixed length), for comparison with them.",
        ),
    ] = "measured",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch intra-op threads of each worker (default: cores // workers), or of "
            "this process when it samples alone. On a machine shared with other busy "
            "processes, 1 is often faster.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes sampling heads side by side, --threads each (default: "
            "one single-threaded worker per core, or 1 = this process alone when --threads "
            "is given or there is one core). Same numbers whatever the count at equal "
            "threads per process; on 2 cores "
            "2 workers ran the demo 1.25x faster than one process with 2 threads.",
        ),
    ] = None,
    draws: _Draws = None,
    until_converged: _UntilDemo = None,
    budget: _BudgetDemo = None,
    restart: Annotated[bool, typer.Option(help=_RESTART_HELP)] = False,
) -> None:
    """Sample every attention head of the shipped byte-level demo transformer."""
    import os

    with _user_errors(out):
        import torch

        from bayes_susc.demo.preset import DemoSettings, run_demo

        if workers is None:
            workers = 1 if threads is not None else max(1, os.cpu_count() or 1)
        if workers == 1 and threads is not None:
            torch.set_num_threads(threads)
        per_worker = threads or max(1, (os.cpu_count() or 1) // workers)
        if preset not in ("measured", "published"):
            raise typer.BadParameter(
                f"must be 'measured' or 'published', got {preset!r}", param_hint="--preset"
            )
        settings = DemoSettings.published() if preset == "published" else DemoSettings()
        if quick:
            # Tiny sizes, the preset's kernel.
            settings = dataclasses.replace(
                DemoSettings.quick(),
                kernel=settings.kernel,
                step_size=settings.step_size,
                kernel_options=settings.kernel_options,
            )
        until = _until_mode(until_converged, draws, budget, default=settings.until)
        changes: dict = {"until": until}
        if draws is not None:
            changes["num_draws"] = draws
        if budget is not None:
            changes["time_budget"] = budget
        if until and draws is not None and draws > settings.max_draws:
            changes["max_draws"] = draws
        settings = dataclasses.replace(settings, **changes)
        summary = run_demo(
            out,
            settings,
            progress=progress,
            workers=workers,
            threads_per_worker=per_worker,
            restart=restart,
            log=_say,
        )
    roles = summary.get("head_roles", {})
    typer.echo(
        f"{'head':6} {'mean phi':>9} {'R-hat':>6} {'ESS':>6} {'div':>4} {'prev':>5} {'ind':>5}"
        "  most expressed tokens"
    )
    for name, row in summary["components"].items():
        role = roles.get(name, {})
        typer.echo(
            f"{name:6} {_num(row['mean_phi'], 9, 4)} {_num(row['rhat_phi'], 6, 3)} "
            f"{_num(row['ess_phi'], 6, 0)} {row['diverged_chains']:4d} "
            f"{_num(role.get('previous_token'), 5, 2)} {_num(role.get('induction'), 5, 2)}  "
            f"{' '.join(row['most_expressed'])}"
        )
    matrix = summary["response_matrix"]
    typer.echo(
        f"response matrix {matrix['shape'][0]} probe tokens x {matrix['shape'][1]} heads; "
        f"entry statuses: {matrix['status_counts']}"
    )
    typer.echo(f"PCA explained variance ratio: {matrix['explained_variance_ratio']}")
    _echo_convergence(summary)
    _echo_resumed(summary)
    typer.echo(
        f"results: {out}/response_matrix.nc, {out}/components/*.nc, figures: {out}/figures/, "
        f"summary: {out}/summary.json"
    )
    typer.echo("(prev, ind: previous-token and induction attention scores of each head)")
    typer.echo(f"report: {summary['report']}")


def _echo_resumed(summary: dict) -> None:
    reused = summary.get("reused", [])
    typer.echo(
        f"sampled now: {len(summary['computed_this_run'])}, reused from the run folder: "
        f"{len(reused)}" + (f" ({', '.join(reused)})" if reused else "")
    )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (e.g. from bayes-susc demo).")],
) -> None:
    """Lay out RUN_DIR/report.html from what RUN_DIR holds (no model, no recomputation)."""
    if not (run_dir / "response_matrix.nc").is_file():
        _say(
            f"error: {run_dir} has no response_matrix.nc; run `bayes-susc demo --out {run_dir}` "
            "or `bayes-susc run CONFIG --out ...` first (both resume an unfinished run)"
        )
        raise typer.Exit(code=2)
    with _user_errors():
        from bayes_susc.report.html import write_report

        path = write_report(run_dir)
    typer.echo(f"report: {path}")


@app.command()
def calibrate(
    config: Annotated[Path, typer.Argument(help="Calibration config (TOML or JSON).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: the config's 'out').")
    ] = None,
    component: Annotated[
        list[str] | None,
        typer.Option(help="Calibrate only these components (repeatable)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """Sweep step size, n-beta and gamma on short chains and recommend one setting.

    CONFIG names a factory "package.module:function" returning the model, loss_fn,
    train_data, eval_data, components and optionally probe_data; its factory_kwargs
    are passed to it, and its [calibrate] table holds the sweep's settings. Writes
    calibration.json, calibration.csv, summary.txt and one trace figure per component
    into the output folder and prints the summary.
    """
    with _user_errors():
        from bayes_susc.checks.calibration import calibrate_from_config

        try:
            result, paths, folder = calibrate_from_config(
                config, out=out, components=component, progress=progress
            )
        except ValueError as exc:
            if "unknown components" not in str(exc):
                raise
            raise typer.BadParameter(str(exc), param_hint="--component") from None
    typer.echo(result.summary())
    typer.echo(f"results: {paths['json']}, {paths['csv']}, figures: {folder}/traces_*.png")


@app.command()
def run(
    config: Annotated[
        Path, typer.Argument(help="Run config (TOML); its schema is in docs/cli.md.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: the config's 'out' or runs/<name>).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    draws: _Draws = None,
    until_converged: _UntilRun = None,
    budget: _BudgetRun = None,
    restart: Annotated[bool, typer.Option(help=_RESTART_HELP)] = False,
) -> None:
    """Sample every component of the model CONFIG describes; resumes an existing run folder."""
    with _user_errors(out or _config_out(config)):
        from bayes_susc.pipeline.config import run_from_config

        overrides: dict = {}
        if draws is not None:
            overrides["sampling"] = {"num_draws": draws}
        until = _until_mode(until_converged, draws, budget, default=None)
        if until is not None:
            overrides["until"] = {"enabled": until}
        if budget is not None:
            overrides["until"]["time_budget"] = budget
        summary = run_from_config(
            config,
            out=out,
            progress=progress,
            restart=restart,
            log=_say,
            overrides=overrides or None,
        )
    typer.echo(
        f"{'component':12} {'mean phi':>9} {'R-hat':>6} {'ESS':>6} {'div':>4}  most expressed"
    )
    for name, row in summary["components"].items():
        typer.echo(
            f"{name:12} {_num(row['mean_phi'], 9, 4)} {_num(row['rhat_phi'], 6, 3)} "
            f"{_num(row['ess_phi'], 6, 0)} {row['diverged_chains']:4d}  "
            f"{' '.join(row['most_expressed'])}"
        )
    m = summary["response_matrix"]
    typer.echo(
        f"response matrix {m['shape'][0]} probes x {m['shape'][1]} components; entry "
        f"statuses: {m['status_counts']}"
    )
    _echo_convergence(summary)
    _echo_resumed(summary)
    typer.echo(f"report: {summary['report']}")


def _until_mode(
    until_converged: bool | None, draws: int | None, budget: float | None, default: bool | None
) -> bool | None:
    """Whether to sample to a target: as asked; else --budget asks for it and --draws
    alone for a fixed length; else ``default``."""
    if until_converged is False and budget is not None:
        raise typer.BadParameter(
            "--budget applies to --until-converged runs, not --fixed-length ones",
            param_hint="--budget",
        )
    if until_converged is not None:
        return until_converged
    if budget is not None:
        return True
    if draws is not None:
        return False
    return default


def _echo_convergence(summary: dict) -> None:
    conv = summary.get("convergence")
    settled = summary["response_matrix"].get("settled_fraction")
    if settled is not None:
        typer.echo(f"settled entries (converged, no sampler failure): {100 * settled:.1f}%")
    if not conv:
        return
    rounds = conv["rounds"]
    typer.echo(
        f"sampled to a target: {conv['reason']} after {len(rounds)} round(s); "
        f"{100 * conv['fraction_converged']:.1f}% of entries converged (target "
        f"{100 * conv['target']['fraction']:g}%) at {rounds[-1]['draws_per_chain_min']}-"
        f"{rounds[-1]['draws_per_chain_max']} draws per chain"
        + (
            f"; about {conv['estimated_draws_per_chain']} draws per chain would be needed"
            if not conv["reached"] and conv.get("estimated_draws_per_chain")
            else ""
        )
    )


def _config_out(config: Path) -> Path | None:
    """The run folder a config names (for the Ctrl-C message), or None."""
    import tomllib

    try:
        cfg = tomllib.loads(config.read_text())
    except (OSError, ValueError):
        return None
    out = cfg.get("out", f"runs/{cfg.get('name', config.stem)}")
    return Path(out) if isinstance(out, str) else None


def _num(v: object, width: int, digits: int) -> str:
    return f"{v:{width}.{digits}f}" if isinstance(v, int | float) else f"{'–':>{width}}"


if __name__ == "__main__":
    app()
