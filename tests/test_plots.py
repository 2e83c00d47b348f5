"""Plots run headless (Agg) on synthetic data, draw what they claim, and save to PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.stats import norm  # noqa: E402

from bayes_susc.estimation import response_matrix as rm  # noqa: E402
from bayes_susc.report import plots  # noqa: E402
from bayes_susc.storage.draws import available_backends, make_inference_data  # noqa: E402

DIMS = ("probe", "component")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def matrix() -> xr.Dataset:
    """A 3-group response matrix over 30 probes × 6 heads with a few unreliable entries."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 10)
    chi = 0.2 * rng.standard_normal((3, 6))[truth] + 0.02 * rng.standard_normal((30, 6))
    se = np.full_like(chi, 0.01)
    z = norm.ppf(0.975)
    ds = xr.Dataset(
        {
            "chi": (DIMS, chi),
            "se": (DIMS, se),
            "ci_low": (DIMS, chi - z * se),
            "ci_high": (DIMS, chi + z * se),
            "p_value": (DIMS, 2 * norm.sf(np.abs(chi) / se)),
            "rhat": (DIMS, np.ones_like(chi)),
            "ess_bulk": (DIMS, np.full_like(chi, 500.0)),
            "ess_tail": (DIMS, np.full_like(chi, 500.0)),
            "mcse": (DIMS, se / 10),
            "num_diverged_chains": ("component", np.zeros(6, dtype=int)),
        },
        coords={
            "probe": np.arange(30),
            "component": [f"L{j // 3}H{j % 3}" for j in range(6)],
            "dataset": ("probe", np.where(truth == 2, "prose", "code")),
            "sequence": ("probe", truth),
            "position": ("probe", np.tile(np.arange(10), 3)),
            "token": ("probe", list("def f(x):\n" * 3)),
        },
        attrs={"method": "block_bootstrap", "confidence": 0.95},
    )
    ds["rhat"].values[[1, 4, 7], [0, 2, 5]] = 1.2
    ds["chi"].values[9, 3] = np.nan
    return rm.assign_status(ds)


@pytest.fixture(scope="module")
def pca_result(matrix):
    return rm.pca(matrix, n_components=3)


def _markers(ax):
    return [c for c in ax.collections if c.get_gid() == plots.UNRELIABLE_GID]


def test_heatmap_marks_every_unreliable_entry(matrix, tmp_path):
    n_bad = int((~matrix["reliable"]).sum())
    assert n_bad >= 4
    fig = plots.heatmap(matrix)
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # matrix + colour bar
    ax = fig.axes[0]
    (markers,) = _markers(ax)
    assert len(markers.get_offsets()) == n_bad
    # markers sit on the unreliable cells (x = component, y = probe)
    rows, cols = np.nonzero(~matrix["reliable"].values)
    np.testing.assert_array_equal(markers.get_offsets(), np.column_stack([cols, rows]))
    (image,) = ax.images
    assert image.get_array().shape == (30, 6)
    assert image.norm.vmin == -image.norm.vmax  # diverging scale centred at 0
    assert image.get_array().mask[9, 3]  # the NaN entry is left blank
    fig.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 0

    plain = plots.heatmap(matrix, "q_value", mark_unreliable=False)
    assert _markers(plain.axes[0]) == []
    with pytest.raises(ValueError, match="assign_status"):
        plots.heatmap(matrix.drop_vars(["status", "reliable"]))


def test_plots_draw_into_a_given_axes(matrix, pca_result, tmp_path):
    fig, axes = plt.subplots(2, 2)
    assert plots.heatmap(matrix, ax=axes[0, 0]) is fig
    assert plots.pca_scatter(pca_result, ax=axes[0, 1]) is fig
    assert plots.pca_loadings(pca_result, ax=axes[1, 0]) is fig
    assert plots.explained_variance(pca_result, ax=axes[1, 1]) is fig
    assert len(fig.axes) == 5  # four panels + the heat map's colour bar
    fig.savefig(tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 0


def test_pca_scatter_colourings(pca_result, tmp_path):
    fig = plots.pca_scatter(pca_result)
    assert len(fig.axes) == 1 and len(fig.axes[0].collections) == 1
    assert len(fig.axes[0].collections[0].get_offsets()) == 30

    by_dataset = plots.pca_scatter(pca_result, color_by="dataset")
    ax = by_dataset.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 2 and sum(len(c.get_offsets()) for c in scatters) == 30
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["code", "prose"]

    labels = rm.cluster(pca_result, 3)
    labels[0] = -1  # shown as excluded / noise
    by_label = plots.pca_scatter(pca_result, color_by=labels, pcs=(1, 3))
    texts = [t.get_text() for t in by_label.axes[0].get_legend().get_texts()]
    assert texts == ["excluded / noise", "0", "1", "2"]
    assert (
        by_label.axes[0].get_xlabel().startswith("PC1") and "PC3" in by_label.axes[0].get_ylabel()
    )

    assert len(plots.pca_scatter(pca_result, color_by="position").axes[0].collections) == 10
    numeric = plots.pca_scatter(pca_result, color_by=pca_result["scores"].sel(pc=3))
    assert len(numeric.axes) == 2  # floats: one scatter + colour bar
    numeric.savefig(tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").stat().st_size > 0
    with pytest.raises(ValueError, match="color_by"):
        plots.pca_scatter(pca_result, color_by="nope")


def test_loadings_and_scree(pca_result, tmp_path):
    fig = plots.pca_loadings(pca_result)
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and all(len(b) == 6 for b in bars)
    np.testing.assert_allclose(
        [r.get_height() for r in bars[0]], pca_result["loadings"].sel(pc=1).values
    )
    assert len(plots.pca_loadings(pca_result, pcs=[2]).axes[0].containers) == 1

    scree = plots.explained_variance(pca_result)
    ax = scree.axes[0]
    (bar,) = ax.containers
    np.testing.assert_allclose(
        [r.get_height() for r in bar], pca_result["explained_variance_ratio"].values
    )
    (line,) = ax.get_lines()
    np.testing.assert_allclose(
        line.get_ydata(), np.cumsum(pca_result["explained_variance_ratio"].values)
    )
    fig.savefig(tmp_path / "loadings.png")
    scree.savefig(tmp_path / "scree.png")
    assert (tmp_path / "scree.png").stat().st_size > 0


def _run(backend: str):
    rng = np.random.default_rng(1)
    chains, draws, probes = 4, 50, 5
    base = {"chain": np.arange(chains), "draw": np.arange(draws)}
    eval_loss = 1.0 + 0.1 * rng.standard_normal((chains, draws))
    probe_loss = 1.0 + 0.1 * rng.standard_normal((chains, draws, probes))
    phi = eval_loss - 1.0
    phi[3, 30:] = np.nan  # chain 3 diverged at draw 30
    eval_loss[3, 30:] = np.nan
    probe_loss[3, 30:] = np.nan
    diverged = np.zeros((chains, draws), dtype=bool)
    diverged[3, 30:] = True
    post = xr.Dataset(
        {
            "phi": (("chain", "draw"), phi),
            "eval_loss": (("chain", "draw"), eval_loss),
            "probe_loss": (("chain", "draw", "probe"), probe_loss),
        },
        coords={**base, "probe": np.arange(probes), "token": ("probe", list("abcde"))},
        attrs={"component": "L0H1"},
    )
    stats = xr.Dataset({"diverged": (("chain", "draw"), diverged)}, coords=base)
    return make_inference_data({"posterior": post, "sample_stats": stats}, backend)


# InferenceData only under ArviZ 0.x
@pytest.mark.parametrize("backend", available_backends())
def test_trace_overlays_chains(backend, tmp_path):
    data = _run(backend)
    fig = plots.trace(data)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(fig.axes) == 1 and len(lines) == 4
    post = data["posterior"] if backend == "datatree" else data.posterior
    np.testing.assert_array_equal(lines[0].get_ydata(), np.asarray(post["phi"].values[0]))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[3] == "chain 3 (diverged)" and legend[0] == "chain 0"
    assert ax.get_title() == "L0H1"

    dl = plots.trace(data, ("probe_loss", 2))
    lines = dl.axes[0].get_lines()
    assert len(lines) == 4
    expected = post["probe_loss"].values[1, :, 2] - post["eval_loss"].values[1]
    np.testing.assert_allclose(lines[1].get_ydata(), expected)
    assert "'c'" in dl.axes[0].get_ylabel()
    dl.savefig(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 0

    with pytest.raises(ValueError, match="probe_loss"):
        plots.trace(data, "probe_loss")
    with pytest.raises(ValueError, match="probe index"):
        plots.trace(data, ("probe_loss", 9))
