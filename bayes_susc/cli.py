"""The ``bayes-susc`` command line: every command is here; the library imports no typer.

Only typer is imported up front, so ``bayes-susc --help`` answers at once; each command
imports what it runs. An error the user can fix (:class:`bayes_susc.errors.UserError`:
a config, a folder, a device, a missing extra) is printed without a traceback and exits
with code 2; Ctrl-C says which components were kept and how to resume (exit 130).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Bayesian susceptibilities of network components.")

_RESTART_HELP = (
    "Discard the folder's results and sample again, instead of refusing a folder "
    "that was started with other settings, weights, data or components."
)


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
        settings = DemoSettings.quick() if quick else DemoSettings()
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
    restart: Annotated[bool, typer.Option(help=_RESTART_HELP)] = False,
) -> None:
    """Sample every component of the model CONFIG describes; resumes an existing run folder."""
    with _user_errors(out or _config_out(config)):
        from bayes_susc.pipeline.config import run_from_config

        summary = run_from_config(config, out=out, progress=progress, restart=restart, log=_say)
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
    _echo_resumed(summary)
    typer.echo(f"report: {summary['report']}")


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
