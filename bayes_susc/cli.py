"""The ``bayes-susc`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Bayesian susceptibilities of network components.")


@app.callback()
def main() -> None:
    """Bayesian susceptibilities of network components, with honest uncertainty."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (resumed if it exists).")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for a smoke test.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a small byte-level transformer and sample every attention head."""
    from bayes_susc.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if quick else DemoSettings()
    summary = run_demo(out, settings, progress=progress)
    typer.echo(
        f"{'head':6} {'mean phi':>9} {'R-hat':>6} {'ESS':>6} {'div':>4}  most expressed tokens"
    )
    for name, row in summary["components"].items():
        typer.echo(
            f"{name:6} {row['mean_phi']:9.4f} {row['rhat_phi']:6.3f} {row['ess_phi']:6.0f} "
            f"{row['diverged_chains']:4d}  {' '.join(row['most_expressed'])}"
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
