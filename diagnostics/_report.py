"""Small helpers shared by the diagnostic studies: binomial intervals, Markdown tables."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special

from bayes_susc.storage.draws import to_jsonable


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when trials is 0."""
    if trials <= 0:
        return math.nan, math.nan
    z = float(special.ndtri(0.5 + confidence / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats printed with 3 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "—" if not np.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN written as null and numpy scalars as Python numbers."""
    path.write_text(json.dumps(to_jsonable(obj), indent=1))


def study_main(
    name: str,
    description: str,
    run_study: Callable[[bool, int], dict[str, Any]],
    plots: Callable[[dict[str, Any], Path], Any],
    report: Callable[[dict[str, Any]], str],
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """The command line every study shares: ``--out DIR`` (default ``runs/<name>``),
    ``--quick`` and ``--seed``; writes ``report.md``, the figures and ``results.json``."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / name)
    parser.add_argument("--quick", action="store_true", help="small run (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_study(args.quick, args.seed)
    plots(results, args.out)
    (args.out / "report.md").write_text(report(results))
    write_json(args.out / "results.json", results)
    print(f"wrote {args.out}/report.md, results.json and its figures")
    return results
