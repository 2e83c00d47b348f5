"""A self-contained HTML report of a run folder (:mod:`bayes_susc.pipeline.run`'s layout).

:func:`write_report` lays out what the run saved and recomputes nothing: it reads
``response_matrix.nc``, ``analyses/pca.nc``, ``analyses/clusters.nc``,
``analyses/health.json``, ``head_roles.nc`` (when the run saved one), ``summary.json``
and ``components/*.nc`` (for the trace plots), and writes ``report.html``: a summary, the
heat map with flagged cells, PCA (scores coloured by data set, loadings), the head-role
scores beside the PC loadings with their correlations, the k-means clusters of the PCA
scores with example tokens in context, explained variance, status counts, a convergence
table, trace health, trace plots of φ, and the settings. It loads no model. Figures are
PNGs embedded as base64 (and also saved under ``figures/``), so the HTML file stands
alone.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from bayes_susc.storage.draws import atomic_write

__all__ = ["SECTIONS", "induction_separation", "open_in_browser", "write_report"]

#: Flags for headless Chromium on a machine without a display or outside network.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: Section headings of the report, in order.
SECTIONS = (
    "Summary",
    "Response matrix",
    "Principal components",
    "Head roles",
    "Token patterns",
    "Clusters",
    "Explained variance",
    "Status counts",
    "Convergence",
    "Trace health",
    "Trace plots",
    "Settings",
)

_PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:2px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
code,.ctx{font-family:monospace;white-space:pre}
img{max-width:100%;display:block;margin:0.6em 0}
.note{color:#555;font-size:0.9em}
</style></head><body>
<h1>$title</h1>
<p class="note">Run folder: <code>$run_dir</code>. Generated: $generated</p>
$body
</body></html>
"""
)


def write_report(run_dir: str | Path, *, n_examples: int = 5) -> Path:
    """Build ``run_dir/report.html`` from the results in ``run_dir``; returns its path.

    Args:
        run_dir: a run folder holding at least ``response_matrix.nc``.
        n_examples: example tokens shown per cluster.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``response_matrix.nc``.
        RunFolderError: it has no saved analyses (a folder made by an older version).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayes_susc.estimation.response_matrix import cluster_examples, load_response_matrix
    from bayes_susc.report import plots
    from bayes_susc.storage.draws import load

    run_dir = Path(run_dir)
    matrix_path = run_dir / "response_matrix.nc"
    if not matrix_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no response_matrix.nc: run `bayes-susc demo --out {run_dir}` "
            "(it resumes an unfinished run) before building its report"
        )
    matrix = load_response_matrix(matrix_path)
    summary = _read_json(run_dir / "summary.json")
    runs = {p.stem: load(p) for p in sorted((run_dir / "components").glob("*.nc"))}
    roles = _head_roles(run_dir)
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)

    def figure(fig, name: str, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
        plt.close(fig)
        png = buf.getvalue()
        atomic_write(figures / f"{name}.png", lambda tmp: Path(tmp).write_bytes(png))
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    res, labels = _analyses(run_dir)
    k = int(labels.attrs.get("n_clusters", len(np.unique(labels.values))))
    examples = cluster_examples(res, labels, k=n_examples)

    parts: list[str] = []
    sec = iter(SECTIONS)

    def heading(extra: str = "") -> None:
        parts.append(f"<h2>{html.escape(next(sec))}</h2>{extra}")

    heading()
    parts.append(_summary(matrix, roles, res))
    heading(
        '<p class="note">χ per probe token (rows) and head (columns); × marks an entry '
        "whose status is not ok.</p>"
    )
    parts.append(figure(plots.heatmap(matrix), "heatmap", "heat map of chi"))
    heading(
        '<p class="note">PCA of the column-standardized matrix (all finite entries). '
        "The sign of each PC is arbitrary.</p>"
    )
    parts.append(figure(plots.pca_scatter(res, color_by="dataset"), "pca_scatter", "PCA scores"))
    parts.append(figure(plots.pca_loadings(res), "pca_loadings", "PCA loadings"))
    heading()
    parts.append(_roles_section(roles, res))
    heading()
    parts.append(_patterns_section(run_dir, plots, figure))
    heading(
        f'<p class="note">k-means (k = {k}) on the probes\' PCA scores; the '
        f"{n_examples} probes nearest each centroid, token marked ⟦…⟧.</p>"
    )
    parts.append(figure(plots.pca_scatter(res, color_by=labels), "pca_clusters", "clusters"))
    parts.append(_cluster_table(labels, examples))
    heading()
    parts.append(figure(plots.explained_variance(res), "explained_variance", "scree plot"))
    heading()
    parts.append(_status_table(matrix))
    heading()
    parts.append(_rounds_section(run_dir, plots, figure))
    parts.append(_convergence_table(matrix, summary))
    heading(
        '<p class="note">Checks of each head\'s traces (bayes_susc.checks.health); each row ends '
        "with the action its worst check suggests.</p>"
    )
    parts.append(_health_table(run_dir))
    heading()
    parts.append(_traces(runs, plots, plt, figure))
    heading()
    parts.append(_settings_table(summary, matrix, roles))

    title = "bayes_susc report"
    page = _PAGE.substitute(
        title=title,
        run_dir=html.escape(str(run_dir)),
        generated=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        body="\n".join(parts),
    )
    out = run_dir / "report.html"
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _analyses(run_dir: Path) -> tuple[xr.Dataset, xr.DataArray]:
    """The PCA and the probes' clusters the run saved (``analyses/pca.nc``, ``clusters.nc``)."""
    from bayes_susc.errors import RunFolderError

    folder = run_dir / "analyses"
    if not (folder / "pca.nc").is_file() or not (folder / "clusters.nc").is_file():
        raise RunFolderError(
            f"{run_dir} has no analyses/pca.nc or analyses/clusters.nc (made by an older "
            "version?); run its command again, which resumes the run and saves them"
        )
    with xr.open_dataset(folder / "pca.nc", engine="netcdf4") as f:
        res = f.load()
    with xr.open_dataset(folder / "clusters.nc", engine="netcdf4") as f:
        clusters = f.load()
    labels = clusters["cluster"]
    labels.attrs.update(clusters.attrs)
    return res, labels


def _head_roles(run_dir: Path) -> xr.Dataset | None:
    """The head-role scores the run saved (``head_roles.nc``), or None."""
    path = run_dir / "head_roles.nc"
    if not path.is_file():
        return None
    with xr.open_dataset(path, engine="netcdf4") as f:
        return f.load()


def html_table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """HTML table; the first ``left`` columns are left-aligned text. Cells are escaped."""

    def cell(tag: str, j: int, v: Any) -> str:
        cls = ' class="l"' if j < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

    head = "".join(cell("th", j, h) for j, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", j, v) for j, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "–"
        return f"{v:.4g}"
    return str(v)


def _settings_table(summary: dict, matrix: xr.Dataset, roles: xr.Dataset | None) -> str:
    rows = [[k, v] for k, v in summary.get("settings", {}).items()]
    out = "<h3>Run</h3>" + (html_table(["setting", "value"], rows, 2) if rows else "<p>–</p>")
    keys = ("estimator", "method", "confidence", "min_ess", "min_draws", "max_rhat", "fdr", "seed")
    rows = [[key, matrix.attrs[key]] for key in keys if key in matrix.attrs]
    rows.append(["shape (probes × components)", " × ".join(map(str, matrix["chi"].shape))])
    out += "<h3>Response matrix</h3>" + html_table(["setting", "value"], rows, 2)
    if roles is not None:
        rows = [[key, v] for key, v in roles.attrs.items()]
        out += "<h3>Head-role scores</h3>" + html_table(["setting", "value"], rows, 2)
    return out


def _summary(matrix: xr.Dataset, roles: xr.Dataset | None, res: xr.Dataset) -> str:
    """Headline figures: size, statuses, variance explained, best-separating PC."""
    status = matrix["status"].values
    n_probe, n_comp = matrix.sizes["probe"], matrix.sizes["component"]
    ok = int((status == "ok").sum())
    names, counts = np.unique(status, return_counts=True)
    flagged = ", ".join(f"{n}: {c}" for n, c in zip(names, counts) if n != "ok") or "none"
    ratios = res["explained_variance_ratio"].values
    items = [
        f"<li>{n_probe:,} probe items × {n_comp} components = {status.size:,} entries, each "
        "with a χ estimate, an interval, R-hat, ESS and a status.</li>",
        f"<li>Status ok: {ok:,} ({100 * ok / status.size:.1f} %); flagged — "
        f"{html.escape(flagged)}.</li>",
        "<li>Variance explained by the principal components: "
        + ", ".join(f"PC{i + 1} {100 * r:.1f} %" for i, r in enumerate(ratios))
        + ".</li>",
    ]
    if roles is not None and "induction" in roles and n_comp >= 3:
        load = res["loadings"].transpose("component", "pc")
        comps = [str(c) for c in load["component"].values]
        n_top = max(1, n_comp // 4)
        sep = induction_separation(load, roles["induction"].sel(component=comps), n_top)
        best = int(sep["pc"].values[int(np.argmax(sep.values))])
        top = np.argsort(-roles["induction"].sel(component=comps).values, kind="stable")[:n_top]
        items.append(
            f"<li>Induction heads (top {n_top} by induction score: "
            f"{html.escape(', '.join(comps[i] for i in top))}): best separated on PC{best}, "
            f"margin {float(sep.max()):.2f} (positive = apart from every other head; "
            "see Head roles).</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _status_table(matrix: xr.Dataset) -> str:
    status = matrix["status"].transpose("probe", "component").values
    names = sorted(set(status.ravel().tolist()), key=lambda s: (s != "ok", s))
    comps = [str(c) for c in matrix["component"].values]
    rows = [[c] + [int((status[:, j] == n).sum()) for n in names] for j, c in enumerate(comps)]
    rows.append(["all"] + [int((status == n).sum()) for n in names])
    return html_table(["component", *names], rows)


def _health_table(run_dir: Path) -> str:
    """The trace checks the run saved (``analyses/health.json``)."""
    rows_by_name = _read_json(run_dir / "analyses" / "health.json")
    if not rows_by_name:
        return "<p>No health verdicts in this folder.</p>"
    columns = list(next(iter(rows_by_name.values())))
    rows = [[name, *(str(row.get(c, "")) for c in columns)] for name, row in rows_by_name.items()]
    return html_table(["component", *columns], rows)


def _patterns_section(run_dir: Path, plots: Any, figure: Any) -> str:
    """Each token pattern's χ per component (``analyses/patterns.nc``) and the patterns
    over-represented in each cluster (``analyses/pattern_enrichment.json``)."""
    path = run_dir / "analyses" / "patterns.nc"
    if not path.is_file():
        return (
            '<p class="note">No token patterns: the run was not given its probe windows '
            "(<code>AnalysisSettings.probe_windows</code>).</p>"
        )
    with xr.open_dataset(path, engine="netcdf4") as f:
        table = f.load()
    names = [str(p) for p in table["pattern"].values]
    counts = [int(n) for n in table["num_tokens"].values]
    shown = table.drop_vars([c for c in table.coords if c != "component"]).rename(pattern="probe")
    shown = shown.assign_coords(probe=[f"{p} ({n})" for p, n in zip(names, counts)])
    note = (
        '<p class="note">χ of each token pattern (rows; token count in brackets) per head: '
        "the mean of its tokens' χ, with its own interval and status (× = not ok); "
        "blue = the head helps these tokens more than average. Rules: "
        "bayes_susc.estimation.patterns.</p>"
    )
    html_parts = [
        note,
        figure(
            plots.heatmap(shown, title="pattern χ   (× = status not ok)"),
            "pattern_heatmap",
            "heat map of pattern chi",
        ),
    ]
    enrichment_path = run_dir / "analyses" / "pattern_enrichment.json"
    if enrichment_path.is_file():
        rows = [r for r in json.loads(enrichment_path.read_text()) if r.get("enriched")]
        if rows:
            rows.sort(key=lambda r: (r["cluster"], r["q_value"]))
            html_parts.append(
                '<p class="note">Patterns over-represented in a k-means cluster of probe '
                "tokens (one-sided hypergeometric test, Benjamini–Hochberg q ≤ "
                "the run's FDR).</p>"
                + html_table(
                    ["cluster", "pattern", "tokens in cluster", "expected", "fold", "q"],
                    [
                        [
                            r["cluster"],
                            r["pattern"],
                            r["count"],
                            r["expected"],
                            r["fold_enrichment"],
                            r["q_value"],
                        ]
                        for r in rows
                    ],
                    left=2,
                )
            )
        else:
            html_parts.append("<p>No pattern is over-represented in any cluster.</p>")
    return "".join(html_parts)


def _rounds_section(run_dir: Path, plots: Any, figure: Any) -> str:
    """How a run to a target went (``convergence.json``), or what a fixed length gave."""
    path = run_dir / "convergence.json"
    if not path.is_file():
        return (
            '<p class="note">Fixed-length run: no convergence target. Sample to one with '
            "<code>--until-converged</code> (or an <code>[until]</code> table).</p>"
        )
    record = _read_json(path)
    last = record["rounds"][-1]
    target = record["target"]
    outcome = (
        f"<b>{html.escape(str(record['reason']))}</b>"
        if record.get("finished")
        else "<b>unfinished</b> (the run was interrupted; resume it)"
    )
    text = (
        f"<p>Sampled to a target: {100 * target['fraction']:g} % of entries passing R-hat ≤ "
        f"{target['max_rhat']:g}, ESS ≥ {target['min_ess']:g} and ≥ {target['min_draws']} "
        f"pooled draws. Outcome: {outcome} after {len(record['rounds'])} round(s) and "
        f"{last['elapsed_seconds']:.0f} s: <b>{100 * last['fraction_converged']:.1f} %</b> "
        f"of entries converged at {last['draws_per_chain_min']}–{last['draws_per_chain_max']} "
        "draws per chain."
    )
    if not record.get("reached") and record.get("estimated_draws_per_chain"):
        text += (
            f" Reaching the target would take about {record['estimated_draws_per_chain']} "
            "draws per chain (scaling ESS ∝ draws and R-hat − 1 ∝ 1/draws from the last "
            "round; an estimate, not a promise)."
        )
    figure_html = figure(
        plots.convergence_rounds(record), "convergence_rounds", "converged fraction by round"
    )
    return text + "</p>" + figure_html


def _convergence_table(matrix: xr.Dataset, summary: dict) -> str:
    ok = (matrix["status"] == "ok").mean("probe")
    ess = matrix["ess"] if "ess" in matrix else matrix["ess_bulk"]
    figures = summary.get("components", {})
    rows = []
    for c in [str(c) for c in matrix["component"].values]:
        row = figures.get(c, {})
        div = row.get(
            "diverged_chains",
            int(matrix["num_diverged_chains"].sel(component=c))
            if "num_diverged_chains" in matrix
            else "–",
        )
        stab = summary.get("stability", {}).get(c, {})
        step = (
            f"{stab['value']:.3g} / {stab['limit']:.3g}"
            if isinstance(stab.get("value"), float) and isinstance(stab.get("limit"), float)
            else "–"
        )
        accept = stab.get("acceptance") or {}
        acceptance = (
            f"{accept['value']:.2f} (floor {accept['floor']:g}, {accept['seconds']:.1f} s)"
            if accept.get("scored") and isinstance(accept.get("value"), float)
            else "–"
        )
        llc = "–"
        if "llc" in matrix and np.isfinite(float(matrix["llc"].sel(component=c))):
            llc = (
                f"{float(matrix['llc'].sel(component=c)):.3g} "
                f"[{float(matrix['llc_low'].sel(component=c)):.3g}, "
                f"{float(matrix['llc_high'].sel(component=c)):.3g}]"
            )
        rows.append(
            [
                c,
                row.get("mean_phi", np.nan),
                row.get("rhat_phi", np.nan),
                row.get("ess_phi", np.nan),
                llc,
                div,
                step,
                acceptance,
                float(ess.sel(component=c).median()),
                float(ok.sel(component=c)),
            ]
        )
    note = (
        '<p class="note">R-hat and ESS of φ are ArviZ\'s rank-normalized split R-hat and '
        f"bulk ESS; an entry is ok when it passes R-hat ≤ {matrix.attrs.get('max_rhat', '?')}, "
        f"ESS ≥ {matrix.attrs.get('min_ess', '?')}, its interval excludes 0 and Benjamini–"
        "Hochberg rejects χ = 0. Low ok fractions: sample longer (num_draws) or more chains. "
        "Step vs stability limit: ε·λmax (SGLD) or ε²·λmax (SGHMC, SGNHT) on the "
        "component's stiffest curvature, against the kernel's limit "
        "(bayes_susc.checks.stability); at or above it every entry is 'unstable'. "
        "Restricted LLC: nβ·(⟨L_E(w)⟩ − L_E(w*)) from the φ draws, with a t interval on "
        "their MCSE (bayes_susc.local_learning_coefficient). "
        "Langevin acceptance: how often MALA would accept the SGLD move (2 chains × 30 "
        "moves after 20 from w*); below its floor every entry is 'low_acceptance'."
        "</p>"
    )
    header = [
        "component",
        "mean φ",
        "R-hat φ",
        "ESS φ",
        "restricted LLC [95 % CI]",
        "diverged chains",
        "step vs stability limit",
        "Langevin acceptance",
        "median entry ESS",
        "fraction ok",
    ]
    return note + html_table(header, rows)


def _cluster_table(labels: xr.DataArray, examples) -> str:
    sizes = {int(c): int((labels.values == c).sum()) for c in np.unique(labels.values)}
    rows = []
    for rec in examples.itertuples(index=False):
        rows.append(
            [
                f"{rec.cluster} (n={sizes.get(int(rec.cluster), 0)})",
                getattr(rec, "dataset", ""),
                repr(str(rec.token)) if hasattr(rec, "token") else rec.probe,
                _visible(str(getattr(rec, "context", ""))),
            ]
        )
    header = ["cluster", "data set", "token", "context"]
    table = html_table(header, rows, 4)
    # Context cells keep their spacing.
    return table.replace('<td class="l">⟪', '<td class="l ctx">').replace("⟫</td>", "</td>")


def _visible(text: str) -> str:
    """Show line breaks and tabs of a context as symbols (marked for the ctx style)."""
    return "⟪" + text.replace("\n", "↵").replace("\r", "␍").replace("\t", "→") + "⟫"


def _traces(runs: dict, plots, plt, figure) -> str:
    if not runs:
        return "<p>No component files.</p>"
    names = list(runs)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        plots.trace(runs[name], "phi", ax=ax)
        ax.set_title(name)
    return '<p class="note">φ per kept draw, chains overlaid.</p>' + figure(
        fig, "trace_phi", "trace plots of phi"
    )


def induction_separation(loadings: xr.DataArray, scores: xr.DataArray, n_top: int) -> xr.DataArray:
    """How well each PC's loadings separate the ``n_top`` highest-scoring heads from the rest.

    For each ``pc``: the margin min(top) − max(rest) of the loadings, or of the negated
    loadings when that is larger (the sign of a PC is arbitrary), divided by the largest
    absolute loading. A positive margin means the PC alone puts the top heads apart from
    all others; 2 is the largest possible (top and rest at opposite extremes). Dividing by
    the largest loading rather than by the loadings' range keeps a small gap small on a
    common-mode PC where every head loads about equally.

    Args:
        loadings: (component, pc) from :func:`bayes_susc.estimation.response_matrix.pca`.
        scores: a head-role score over ``component`` (e.g. ``induction``).
        n_top: number of top-scoring heads (1 ≤ n_top < number of heads).
    """
    comps = [str(c) for c in loadings["component"].values]
    s = scores.sel(component=comps).values
    if not 1 <= n_top < len(comps):
        raise ValueError(f"n_top must be in [1, {len(comps) - 1}], got {n_top}")
    top = np.zeros(len(comps), dtype=bool)
    top[np.argsort(-s, kind="stable")[:n_top]] = True
    margins = []
    for pc in loadings["pc"].values:
        x = loadings.sel(pc=pc).transpose("component").values
        span = np.abs(x).max() if np.abs(x).max() > 0 else 1.0
        m = max(x[top].min() - x[~top].max(), (-x)[top].min() - (-x)[~top].max())
        margins.append(m / span)
    return xr.DataArray(np.array(margins), dims="pc", coords={"pc": loadings["pc"].values})


def _roles_section(roles: xr.Dataset | None, res: xr.Dataset) -> str:
    if roles is None:
        return "<p>No head-role scores (this run saved no head_roles.nc).</p>"
    from bayes_susc.checks.head_roles import ROLE_SCORES

    load = res["loadings"].transpose("component", "pc")
    comps = [str(c) for c in load["component"].values]
    names = [n for n in ROLE_SCORES if n in roles]
    pcs = [int(p) for p in load["pc"].values]
    r = roles.sel(component=comps)
    rows = [
        [c]
        + [float(load.sel(component=c, pc=p)) for p in pcs]
        + [float(r[n].sel(component=c)) for n in names]
        for c in comps
    ]
    note = (
        '<p class="note">Role scores are mean attention probabilities in [0, 1] '
        "(bayes_susc.checks.head_roles): previous token (q→q−1), induction and duplicate token "
        "(random block repeated twice: q→q−L+1 and q→q−L), first token (q→0), self (q→q). "
        "Left: each head's loading on the principal components of the response matrix.</p>"
    )
    out = note + html_table(["component", *[f"PC{p} loading" for p in pcs], *names], rows)
    corr_rows = []
    for n in names:
        v = r[n].values
        row: list[Any] = [n]
        for p in pcs:
            x = load.sel(pc=p).values
            ok = np.isfinite(x) & np.isfinite(v)
            if ok.sum() > 2 and np.std(x[ok]) > 0 and np.std(v[ok]) > 0:
                row.append(float(np.corrcoef(x[ok], v[ok])[0, 1]))
            else:
                row.append(float("nan"))
        corr_rows.append(row)
    out += (
        "<h3>Correlation of role scores with PC loadings (across heads)</h3>"
        f'<p class="note">Pearson r over {len(comps)} heads; the sign follows the arbitrary '
        "sign of each PC, so read |r|.</p>"
        + html_table(["score", *[f"PC{p}" for p in pcs]], corr_rows)
    )
    if len(comps) >= 3 and "induction" in names:
        n_top = max(1, len(comps) // 4)
        sep = induction_separation(load, r["induction"], n_top)
        top = [comps[i] for i in np.argsort(-r["induction"].values, kind="stable")[:n_top]]
        out += (
            "<h3>Do the principal components separate the induction heads?</h3>"
            f'<p class="note">Top {n_top} head(s) by induction score: '
            f"{html.escape(', '.join(top))}. "
            "Margin = gap between their loadings and all other heads' on one PC, over "
            "the largest absolute loading; positive = separated.</p>"
            + html_table(["PC", "margin"], [[f"PC{p}", float(sep.sel(pc=p))] for p in pcs])
        )
    return out


def open_in_browser(
    report: str | Path,
    *,
    screenshot: str | Path | None = None,
    chromium: str = "/usr/bin/chromium",
    width: int = 1100,
    height: int = 900,
) -> dict[str, Any]:
    """Load a report in headless Chromium (through Playwright) and say what went wrong.

    Args:
        report: path of an HTML report.
        screenshot: where to write a PNG of the first ``width`` × ``height`` pixels.
        chromium: the Chromium executable (Debian's ``chromium`` package by default;
            Playwright's own browser download is not used).
        width: viewport width in CSS pixels.
        height: viewport height in CSS pixels.

    Returns:
        ``{"errors": [...], "images": [(alt, natural width in px), ...], "title": str}``;
        errors collects uncaught page errors, console errors and failed requests.

    Raises:
        ImportError: Playwright is not installed (``pip install playwright``).
        FileNotFoundError: ``report`` or ``chromium`` does not exist.
    """
    from playwright.sync_api import sync_playwright

    report = Path(report).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"report {report} does not exist")
    if not Path(chromium).is_file():
        raise FileNotFoundError(f"chromium executable {chromium} not found")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
            )
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.naturalWidth])")
            title = page.title()
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return {"errors": errors, "images": [tuple(i) for i in images], "title": title}


def write_table_report(out_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """A tables-only ``report.html`` (settings, status counts, components) for a run with
    fewer than two estimable components, which the full report's PCA figures need."""
    out_dir = Path(out_dir)
    rows = [[k, v] for k, v in summary["settings"].items()]
    comp_rows = [
        [
            n,
            c["mean_phi"],
            c["rhat_phi"],
            c["ess_phi"],
            c["diverged_chains"],
            c["chi_min"],
            c["chi_max"],
            " ".join(c["most_expressed"]),
        ]
        for n, c in summary["components"].items()
    ]
    counts = summary["response_matrix"]["status_counts"]
    body = (
        "<h2>Settings</h2>"
        + html_table(["setting", "value"], rows, 2)
        + "<h2>Status counts</h2>"
        + html_table(["status", "entries"], [[k, v] for k, v in counts.items()])
        + "<h2>Components</h2>"
        + html_table(
            [
                "component",
                "mean φ",
                "R-hat φ",
                "ESS φ",
                "diverged chains",
                "χ min",
                "χ max",
                "most expressed",
            ],
            comp_rows,
        )
        + '<p class="note">Fewer than two estimable components: the response-matrix '
        "figures (heat map, PCA, clusters) need at least two; the numbers are in "
        "response_matrix.nc.</p>"
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>bayes_susc report</title></head><body><h1>bayes_susc report</h1>"
        f"<p>Run folder: <code>{html.escape(str(out_dir))}</code></p>{body}</body></html>"
    )
    path = out_dir / "report.html"
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
