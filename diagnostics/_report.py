"""Small helpers shared by the diagnostic studies: binomial intervals, Markdown tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special

from bayes_susc.storage import to_jsonable


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
