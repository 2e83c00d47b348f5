"""What a run folder holds besides draws: headline figures and the cleanup of a killed run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bayes_susc.estimation.susceptibility import susceptibility
from bayes_susc.storage.draws import get_group

__all__ = ["component_summary", "remove_stale_temporaries"]


def remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files a killed run left behind (``atomic_write`` names them
    ``<target name>.<random>.tmp``; a finished write renames or removes its own)."""
    for folder in (out, out / "components", out / "figures"):
        for tmp in folder.glob("*.*.tmp"):
            if tmp.is_file():
                tmp.unlink()


def component_summary(data: Any, chi: Any = None) -> dict:
    """Headline figures of one component's run.

    Args:
        data: the component's draws (InferenceData/DataTree from :func:`bayes_susc.sample`
            with probe losses).
        chi: its χ over ``probe`` (loss units squared), e.g. its column of the response
            matrix; ``None``: estimated from ``data``.

    Returns:
        ``mean_phi`` (nats), ``rhat_phi`` and ``ess_phi`` (draws), ``diverged_chains``,
        ``most_expressed`` (the five probe tokens of most negative χ) and ``chi_min`` /
        ``chi_max``; NaN figures and no tokens for a component whose chains all diverged.
    """
    import warnings

    import arviz as az

    post = get_group(data, "posterior")
    stats = get_group(data, "sample_stats")
    values = np.asarray((susceptibility(data) if chi is None else chi).values, dtype=float)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    tokens = post["token"].values if "token" in post.coords else post["probe"].values
    phi = post["phi"].values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN φ of a diverged component
        return {
            "mean_phi": float(np.nanmean(phi)),
            "rhat_phi": float(az.rhat(phi)),
            "ess_phi": float(az.ess(phi)),
            "diverged_chains": int(stats["diverged"].any("draw").sum()),
            "most_expressed": [repr(str(tokens[i])) for i in order[:5]],
            "chi_min": float(values[finite].min()) if finite.size else float("nan"),
            "chi_max": float(values[finite].max()) if finite.size else float("nan"),
        }
