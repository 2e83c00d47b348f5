"""The ``bayes-susc`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Bayesian susceptibilities of network components.")


@app.callback()
def main() -> None:
    """Bayesian susceptibilities of network components, with honest uncertainty."""
    from bayes_susc.allocator import keep_freed_memory

    # The command owns its process: keep freed activations instead of faulting them in
    # again every step (see bayes_susc.allocator).
    keep_freed_memory()


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
) -> None:
    """Sample every attention head of the shipped byte-level demo transformer."""
    import os

    import torch

    from bayes_susc.demo import DemoSettings, run_demo

    if workers is None:
        workers = 1 if threads is not None else max(1, os.cpu_count() or 1)
    if workers == 1 and threads is not None:
        torch.set_num_threads(threads)
    per_worker = threads or max(1, (os.cpu_count() or 1) // workers)
    settings = DemoSettings.quick() if quick else DemoSettings()
    summary = run_demo(
        out, settings, progress=progress, workers=workers, threads_per_worker=per_worker
    )
    roles = summary.get("head_roles", {})
    typer.echo(
        f"{'head':6} {'mean phi':>9} {'R-hat':>6} {'ESS':>6} {'div':>4} {'prev':>5} {'ind':>5}"
        "  most expressed tokens"
    )
    for name, row in summary["components"].items():
        role = roles.get(name, {})
        typer.echo(
            f"{name:6} {row['mean_phi']:9.4f} {row['rhat_phi']:6.3f} {row['ess_phi']:6.0f} "
            f"{row['diverged_chains']:4d} {role.get('previous_token', float('nan')):5.2f} "
            f"{role.get('induction', float('nan')):5.2f}  {' '.join(row['most_expressed'])}"
        )
    matrix = summary["response_matrix"]
    typer.echo(
        f"response matrix {matrix['shape'][0]} probe tokens x {matrix['shape'][1]} heads; "
        f"entry statuses: {matrix['status_counts']}"
    )
    typer.echo(f"PCA explained variance ratio: {matrix['explained_variance_ratio']}")
    typer.echo(
        f"results: {out}/response_matrix.nc, {out}/components/*.nc, figures: {out}/figures/, "
        f"summary: {out}/summary.json"
    )
    typer.echo("(prev, ind: previous-token and induction attention scores of each head)")
    typer.echo(f"report: {summary['report']}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (e.g. from `bayes-susc demo`).")],
) -> None:
    """Rebuild RUN_DIR/report.html from the results in RUN_DIR."""
    from bayes_susc.report import write_report

    if not (run_dir / "response_matrix.nc").is_file():
        typer.echo(
            f"error: {run_dir} has no response_matrix.nc; run `bayes-susc demo --out {run_dir}` "
            "or `bayes-susc run CONFIG --out ...` first (both resume an unfinished run)",
            err=True,
        )
        raise typer.Exit(code=1)
    path = write_report(run_dir)
    typer.echo(f"report: {path}")


def _register_calibrate() -> None:
    from bayes_susc.calibration import calibrate_command

    app.command("calibrate")(calibrate_command)


_register_calibrate()


def _register_run() -> None:
    from bayes_susc.run_config import run_command

    app.command("run")(run_command)


_register_run()


if __name__ == "__main__":
    app()
