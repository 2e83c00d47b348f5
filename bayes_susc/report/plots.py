"""Plots of response matrices, their PCA, and sampling traces (matplotlib).

Plots only draw: every number shown comes from :mod:`bayes_susc.estimation.response_matrix` or
from the stored draws (DESIGN.md §6, the ArviZ split of data, statistics and plots).
Each function takes an optional ``ax`` and returns the ``Figure``; nothing here picks a
GUI backend, so they run under ``Agg`` (servers, CI) as well as in notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from bayes_susc.storage.draws import get_group

#: Diverging colormap for χ: blue = χ < 0 (the component helps the item more than
#: average, "expression"), red = χ > 0 ("suppression").
DIVERGING_CMAP = "RdBu_r"
UNRELIABLE_GID = "unreliable"
_NOISE_COLOR = "0.6"


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def _probe_labels(ds: xr.Dataset | xr.DataArray) -> list[str]:
    n = ds.sizes["probe"]
    if "token" in ds.coords and ds.coords["token"].dims == ("probe",):
        return [repr(str(t)) for t in ds.coords["token"].values]
    return (
        [str(v) for v in ds.coords["probe"].values]
        if "probe" in ds.coords
        else list(map(str, range(n)))
    )


def _unreliable_mask(ds: xr.Dataset, like: xr.DataArray) -> np.ndarray:
    if "reliable" in ds:
        ok = ds["reliable"]
    elif "status" in ds:
        ok = ds["status"] == "ok"
    else:
        raise ValueError(
            "mark_unreliable=True needs a 'reliable' or 'status' variable: run "
            "bayes_susc.estimation.response_matrix.assign_status first, or pass "
            "mark_unreliable=False"
        )
    return ~ok.broadcast_like(like).transpose("probe", "component").values.astype(bool)


def heatmap(
    ds: xr.Dataset,
    var: str = "chi",
    *,
    mark_unreliable: bool = True,
    ax: Axes | None = None,
    cmap: str = DIVERGING_CMAP,
    max_labels: int = 60,
    title: str | None = None,
) -> Figure:
    """Heat map of a response-matrix variable over (probe, component).

    The colour scale is diverging and symmetric about 0 (±max |value|); non-finite
    entries are left grey. With ``mark_unreliable`` every entry whose status is not
    ``"ok"`` gets a black ×, drawn as one scatter collection with ``gid="unreliable"``.
    Probes are rows (labelled by ``token`` when present), components columns; tick
    labels are drawn when there are at most ``max_labels`` of them.
    """
    if var not in ds:
        raise ValueError(f"var {var!r} is not a variable of ds; variables: {list(ds.data_vars)}")
    x = ds[var]
    if set(x.dims) != {"probe", "component"}:
        raise ValueError(f"{var} must have dims ('probe', 'component'), got {x.dims}")
    x = x.transpose("probe", "component")
    values = np.asarray(x.values, dtype=float)
    n_probe, n_comp = values.shape
    fig, ax = _axes(ax, (min(2 + 0.5 * n_comp, 14), min(2 + 0.25 * n_probe, 12)))

    finite = values[np.isfinite(values)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    image = ax.imshow(
        np.ma.masked_invalid(values),
        aspect="auto",
        interpolation="nearest",
        cmap=colormap,
        norm=Normalize(vmin=-vmax, vmax=vmax),
    )
    fig.colorbar(image, ax=ax, label=x.attrs.get("long_name", var))
    if mark_unreliable:
        rows, cols = np.nonzero(_unreliable_mask(ds, x))
        ax.scatter(
            cols,
            rows,
            marker="x",
            c="k",
            s=max(4.0, min(40.0, 2000.0 / max(n_probe, n_comp))),
            linewidths=0.8,
            label="unreliable",
            gid=UNRELIABLE_GID,
        )
        ax.set_xlim(-0.5, n_comp - 0.5)
        ax.set_ylim(n_probe - 0.5, -0.5)
    if n_comp <= max_labels:
        ax.set_xticks(range(n_comp), [str(c) for c in x.coords["component"].values], rotation=90)
    if n_probe <= max_labels:
        ax.set_yticks(range(n_probe), _probe_labels(x))
    ax.set_xlabel("component")
    ax.set_ylabel("probe")
    if title is None:
        title = f"{var}   (× = status not ok)" if mark_unreliable else var
    ax.set_title(title)
    return fig


def _pc_label(res: xr.Dataset, pc: int) -> str:
    ratio = float(res["explained_variance_ratio"].sel(pc=pc))
    return f"PC{pc} ({100 * ratio:.1f}%)"


def pca_scatter(
    pca_result: xr.Dataset,
    color_by: str | xr.DataArray | None = None,
    *,
    pcs: tuple[int, int] = (1, 2),
    ax: Axes | None = None,
    max_categories: int = 20,
) -> Figure:
    """Probe scores on two principal components.

    Args:
        pca_result: from :func:`bayes_susc.estimation.response_matrix.pca`.
        color_by: ``None``; the name of a probe coordinate (e.g. ``"dataset"``); or a
            DataArray over ``probe`` such as the labels from
            :func:`bayes_susc.estimation.response_matrix.cluster`. Integer or text values with at
            most ``max_categories`` distinct values are drawn as categories (one
            scatter and legend entry each; label −1, excluded/noise, in grey), other
            numbers with a colour bar.
        pcs: the two components to plot (1-based).

    Probes without scores (left out of the PCA) are not drawn.
    """
    scores = pca_result["scores"]
    for pc in pcs:
        if pc not in scores.coords["pc"].values:
            raise ValueError(
                f"pcs must name computed components {list(scores.pc.values)}, got {pc}"
            )
    sx = scores.sel(pc=pcs[0]).values
    sy = scores.sel(pc=pcs[1]).values
    drawn = np.isfinite(sx) & np.isfinite(sy)
    fig, ax = _axes(ax, (5.5, 4.5))
    if color_by is None:
        ax.scatter(sx[drawn], sy[drawn], s=14)
    else:
        if isinstance(color_by, str):
            if color_by not in pca_result.coords or pca_result.coords[color_by].dims != ("probe",):
                raise ValueError(f"color_by {color_by!r} is not a probe coordinate of pca_result")
            values = pca_result.coords[color_by].values
            name = color_by
        elif isinstance(color_by, xr.DataArray):
            if color_by.dims != ("probe",) or color_by.sizes["probe"] != scores.sizes["probe"]:
                raise ValueError("color_by must be a DataArray over the same 'probe' dimension")
            values = color_by.values
            name = color_by.name or "label"
        else:
            raise TypeError(
                f"color_by must be None, a coordinate name or a DataArray, got "
                f"{type(color_by).__name__}"
            )
        uniq = np.unique(values[drawn])
        is_int = np.issubdtype(values.dtype, np.integer)
        continuous = np.issubdtype(values.dtype, np.floating) or (
            is_int and len(uniq) > max_categories
        )
        if continuous:
            points = ax.scatter(sx[drawn], sy[drawn], s=14, c=values[drawn].astype(float))
            fig.colorbar(points, ax=ax, label=name)
        else:
            cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
            k = 0
            for u in uniq:
                sel = drawn & (values == u)
                noise = bool(is_int and u < 0)
                color = _NOISE_COLOR if noise else cycle[k % len(cycle)]
                k += 0 if noise else 1
                label = "excluded / noise" if noise else str(u)
                ax.scatter(sx[sel], sy[sel], s=14, color=color, label=label)
            if len(uniq) <= max_categories:
                ax.legend(title=name, fontsize="small", loc="best")
    ax.axhline(0, color="0.8", lw=0.6, zorder=0)
    ax.axvline(0, color="0.8", lw=0.6, zorder=0)
    ax.set_xlabel(_pc_label(pca_result, pcs[0]))
    ax.set_ylabel(_pc_label(pca_result, pcs[1]))
    return fig


def pca_loadings(
    pca_result: xr.Dataset,
    *,
    pcs: Sequence[int] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Loadings of each component (head) on the principal components, as grouped bars.

    One bar series (``BarContainer``) per principal component in ``pcs`` (default: all).
    """
    load = pca_result["loadings"].transpose("component", "pc")
    pcs = list(load.coords["pc"].values) if pcs is None else list(pcs)
    comps = [str(c) for c in load.coords["component"].values]
    fig, ax = _axes(ax, (min(3 + 0.45 * len(comps), 14), 3.8))
    x = np.arange(len(comps))
    width = 0.8 / max(len(pcs), 1)
    for k, pc in enumerate(pcs):
        ax.bar(x + (k - (len(pcs) - 1) / 2) * width, load.sel(pc=pc).values, width, label=f"PC{pc}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, comps, rotation=90 if len(comps) > 8 else 0)
    ax.set_xlabel("component")
    ax.set_ylabel("loading")
    ax.legend(fontsize="small")
    return fig


def explained_variance(pca_result: xr.Dataset, *, ax: Axes | None = None) -> Figure:
    """Scree plot: explained-variance ratio per principal component, and its running sum."""
    ratio = pca_result["explained_variance_ratio"]
    pcs = ratio.coords["pc"].values
    fig, ax = _axes(ax, (4.5, 3.5))
    ax.bar(pcs, ratio.values, label="per component")
    ax.plot(pcs, np.cumsum(ratio.values), "o-", color="C1", label="cumulative")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(pcs, [f"PC{p}" for p in pcs])
    ax.set_ylabel("explained variance ratio")
    ax.legend(fontsize="small")
    return fig


def convergence_rounds(record: dict[str, Any], *, ax: Axes | None = None) -> Figure:
    """Share of converged entries after each round of a run to a target, against the
    mean kept draws per chain over components; the target as a dashed line.

    Args:
        record: a run folder's ``convergence.json`` (``rounds`` with
            ``draws_per_chain_mean`` and ``fraction_converged``; ``target.fraction``).
    """
    rounds = record["rounds"]
    x = [r["draws_per_chain_mean"] for r in rounds]
    y = [100 * r["fraction_converged"] for r in rounds]
    fig, ax = _axes(ax, (5.0, 3.5))
    ax.plot(x, y, "o-", label="converged entries")
    ax.axhline(100 * record["target"]["fraction"], ls="--", color="C3", label="target")
    for r, xi, yi in zip(rounds, x, y):
        ax.annotate(
            f"{r['elapsed_seconds']:.0f} s",
            (xi, yi),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize="x-small",
        )
    ax.set_xlabel("kept draws per chain (mean over components)")
    ax.set_ylabel("entries passing R-hat, ESS, draws (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize="small", loc="lower right")
    return fig


def trace(
    data: Any,
    var: str | tuple[str, int] = "phi",
    *,
    ax: Axes | None = None,
) -> Figure:
    """Trace of one observable of one component's sampling run, chains overlaid.

    Args:
        data: InferenceData/DataTree from :func:`bayes_susc.sample` (read through
            :func:`bayes_susc.storage.draws.get_group`).
        var: a (chain, draw) variable of the posterior group (``"phi"``,
            ``"eval_loss"``, ...), or ``("probe_loss", i)`` for the series
            ΔL_i = ℓ_i − L_E of the probe at position ``i``.

    Draws of a diverged chain are NaN and show as a gap; its legend entry says
    "diverged" when ``sample_stats.diverged`` flags it.
    """
    post = get_group(data, "posterior")
    if isinstance(var, tuple):
        if len(var) != 2 or var[0] != "probe_loss":
            raise ValueError(f"var must be a variable name or ('probe_loss', index), got {var!r}")
        i = int(var[1])
        n_probe = post.sizes["probe"]
        if not -n_probe <= i < n_probe:
            raise ValueError(f"probe index must be in [0, {n_probe}), got {i}")
        series = (post["probe_loss"].isel(probe=i) - post["eval_loss"]).transpose("chain", "draw")
        label = _probe_labels(post)[i]
        ylabel = f"ΔL = ℓ − L_E (probe {i}: {label})"
    else:
        if var not in post:
            raise ValueError(f"var {var!r} is not in the posterior group: {list(post.data_vars)}")
        series = post[var]
        if set(series.dims) != {"chain", "draw"}:
            raise ValueError(
                f"{var} has dims {series.dims}; pick one series, e.g. ('probe_loss', index)"
            )
        series = series.transpose("chain", "draw")
        ylabel = var
    diverged = _diverged_chains(data, series.sizes["chain"])
    fig, ax = _axes(ax, (7, 3))
    draws = (
        series.coords["draw"].values if "draw" in series.coords else np.arange(series.sizes["draw"])
    )
    chains = (
        series.coords["chain"].values
        if "chain" in series.coords
        else np.arange(series.sizes["chain"])
    )
    for k, c in enumerate(chains):
        tag = " (diverged)" if diverged[k] else ""
        ax.plot(draws, series.values[k], lw=0.8, alpha=0.85, label=f"chain {c}{tag}")
    ax.set_xlabel("draw")
    ax.set_ylabel(ylabel)
    component = post.attrs.get("component")
    if component is not None:
        ax.set_title(str(component))
    ax.legend(fontsize="small", ncol=min(len(chains), 4))
    return fig


def _diverged_chains(data: Any, num_chains: int) -> np.ndarray:
    try:
        stats = get_group(data, "sample_stats")
    except KeyError:
        return np.zeros(num_chains, dtype=bool)
    if "diverged" not in stats:
        return np.zeros(num_chains, dtype=bool)
    flag = stats["diverged"]
    other = [d for d in flag.dims if d != "chain"]
    return np.asarray(flag.any(dim=other).values, dtype=bool).reshape(num_chains)
