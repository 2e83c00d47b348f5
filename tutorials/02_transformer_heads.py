# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The heads of a transformer
#
# Tutorial 01 estimated χ for one component of a linear model. Here the components are
# the **attention heads of a small language model**, and the probes are thousands of
# individual **tokens**. One χ per (token, head) pair makes a **response matrix**: each
# token's row is a profile of how much every head's weights matter for predicting it,
# relative to a typical token. Reading that matrix is the point of the method — tokens
# with similar profiles are handled by the same machinery, and heads whose columns
# covary do related jobs.
#
# The model is the package's demo: a byte-level attention-only transformer trained on
# Python standard-library code and `pydoc` prose, shipped with the package as a
# checkpoint. `bayes_susc.demo.preset.run_demo` samples every head (4 chains each) with
# the kernel the study `python -m diagnostics.kernels_heads` measured best on these heads
# (SGNHT; `DemoSettings.published()` keeps the papers' SGLD), extends the chains in rounds
# until 99 % of the entries pass R-hat, ESS and draw checks (or its time budget is
# spent), evaluates φ and every probe token's loss at each draw, and builds the response
# matrix with intervals and statuses — the same pipeline as `bayes-susc demo`. Fast mode
# (`BAYES_SUSC_FAST=1`, the test suite) uses `DemoSettings.quick()`: a few heads, short
# chains of a fixed length, a few probe sequences. The notebook runs the full settings.
#
# Every number the prose states is asserted below.

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr

from bayes_susc import load
from bayes_susc.demo.preset import DemoSettings, run_demo
from bayes_susc.estimation.response_matrix import (
    cluster,
    cluster_examples,
    load_response_matrix,
    pca,
)
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.report import plots

FAST = os.environ.get("BAYES_SUSC_FAST", "") not in ("", "0")
settings = DemoSettings.quick() if FAST else DemoSettings()
plt.rcParams["figure.dpi"] = 72
pd.set_option("display.float_format", lambda x: f"{x: .3g}")
pd.set_option("display.width", 160)
print(f"fast mode: {FAST}")
print(settings)

# %% [markdown]
# ## Running the demo
#
# `run_demo(out, settings)` writes a run folder: `components/<head>.nc` (one ArviZ object
# per head: φ, eval loss and every probe token's loss per chain and draw),
# `response_matrix.nc`, `head_roles.nc` and `summary.json`. Re-running into the same
# folder resumes (finished heads are loaded, not resampled). We write to a temporary
# folder; `report=False` skips the HTML report (`bayes-susc report DIR` builds it later
# from the folder).

# %%
workdir = tempfile.TemporaryDirectory()
out = Path(workdir.name) / "demo"
start = time.perf_counter()
# Two heads at a time on two worker processes, as `bayes-susc demo` does on two cores.
summary = run_demo(out, settings, progress=False, report=False, workers=1 if FAST else 2)
print(f"demo ran in {time.perf_counter() - start:.0f} s")
print(sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## The response matrix
#
# `load_response_matrix` returns an `xarray.Dataset` over (`probe`, `component`). Its
# components are the sampled heads, named `L{layer}H{head}`; its probes are tokens, with
# coordinates saying where each came from (`dataset`: code or prose, `sequence`,
# `position`, `token`). Besides χ every entry carries its standard error, interval,
# p-value and Benjamini–Hochberg q-value, R-hat, bulk and tail ESS, and a **status**.

# %%
matrix = load_response_matrix(out / "response_matrix.nc")
heads = [str(h) for h in matrix["component"].values]
n_probe, n_head = matrix["chi"].shape
print(f"{n_probe} probe tokens x {n_head} heads: {heads}")
print("probe coordinates:", [c for c in matrix.coords if c not in ("component",)])
assert n_probe == settings.n_probe * (settings.seq_len - 1)
assert list(summary["response_matrix"]["shape"]) == [n_probe, n_head]
matrix[["chi", "se", "ci_low", "ci_high", "rhat", "ess_bulk", "status"]].isel(
    probe=slice(0, 5)
).to_dataframe()

# %% [markdown]
# The matrix is just the per-head runs, estimated jointly: re-estimating one head from its
# saved draws gives the same column. (`estimate_many` resamples all heads with the same
# draws so that their intervals are paired; the point estimates do not depend on that.)

# %%
first = heads[0]
column = estimate(load(out / "components" / f"{first}.nc"))
np.testing.assert_allclose(column["chi"].values, matrix["chi"].sel(component=first).values)
print(f"column {first} reproduced from components/{first}.nc")

# %% [markdown]
# ## Flagged entries, and why
#
# An entry's status is `ok` or the **first** check it fails, in this order:
#
# 1. `diverged` — a chain of the head went non-finite;
# 2. `nonfinite` — the estimate or its interval is NaN or infinite;
# 3. `rhat` — R-hat of the entry's product series above 1.01: the chains disagree, so
#    the run is too short for this entry;
# 4. `ess` — fewer than 100 effective draws (min of bulk and tail ESS), or fewer than
#    800 kept draws over the chains (`min_draws`): the interval would be unreliable (the
#    coverage study finds nominal coverage from ESS ≈ 100 at 4 × 200 draws, not below);
# 5. `ci_contains_zero` — converged, but the interval includes 0: no evidence the head
#    treats this token differently from a typical one;
# 6. `not_significant_bh` — the interval excludes 0 but the entry does not survive
#    Benjamini–Hochberg at FDR 5% across the whole matrix (with thousands of entries,
#    some intervals exclude 0 by chance).
#
# Flags are the honest default: with 4 chains × a few hundred draws many entries of a
# real network do not reach R-hat ≤ 1.01. That says "run longer", not "χ is zero".
# Entries flagged for convergence still carry an estimate; the analyses below can use
# them (`weights=None`) or not (`weights="status"`).

# %%
counts = matrix["status"].to_dataframe().groupby("component")["status"].value_counts()
print(counts.unstack(fill_value=0))

status = matrix["status"].values
rhat, ess = matrix["rhat"].values, np.minimum(matrix["ess_bulk"], matrix["ess_tail"]).values
lo, hi, q = matrix["ci_low"].values, matrix["ci_high"].values, matrix["q_value"].values
# Each flag is explained by the numbers it names, and the order of the checks holds.
assert np.all(~(rhat[status == "rhat"] <= 1.01))
few = (matrix["num_draws"] < matrix.attrs["min_draws"]).broadcast_like(matrix["status"])
few = few.transpose(*matrix["status"].dims).values
flag = status == "ess"
assert np.all(rhat[flag] <= 1.01) and np.all(~(ess[flag] >= 100) | few[flag])
converged = (status == "ci_contains_zero") | (status == "not_significant_bh") | (status == "ok")
assert np.all((rhat[converged] <= 1.01) & (ess[converged] >= 100))
zero_in = status == "ci_contains_zero"
assert np.all((lo[zero_in] <= 0) & (hi[zero_in] >= 0))
assert np.all((q[status == "ok"] <= 0.05) & ((hi[status == "ok"] < 0) | (lo[status == "ok"] > 0)))

# %% [markdown]
# The heat map shows χ for every (token, head) with a × on each flagged entry (rows are
# subsampled for legibility). Blue: the head helps this token more than average
# (expression, χ < 0); red: less (suppression).

# %%
rows = np.linspace(0, n_probe - 1, min(n_probe, 120)).astype(int)
fig = plots.heatmap(matrix.isel(probe=rows), title="χ of each head for sampled tokens")
fig.set_size_inches(6, 7)
plt.show()

# %% [markdown]
# ## PCA: the main axes of variation across heads
#
# Heads differ in overall scale, so each column is z-scored first (the published
# recipe); PCA then finds the directions in head space along which token profiles vary
# most. Here every finite entry is used (`weights=None`), as the demo's report does;
# `weights="status"` would fit the components to reliable entries only and fill the rest
# by a low-rank model. The loadings say which heads move together.

# %%
n_pc = min(3, n_head)
res = pca(matrix, n_components=n_pc, weights=None)
ratio = res["explained_variance_ratio"].values
print("explained variance ratio:", np.round(ratio, 3))
assert np.all(np.diff(ratio) <= 1e-12) and 0 < ratio.sum() <= 1 + 1e-9
loadings = res["loadings"].to_pandas()
loadings  # noqa: B018

# %% [markdown]
# ## Clusters of tokens, with examples in context
#
# k-means on the first principal-component scores groups tokens with similar profiles.
# `cluster_examples` lists the tokens closest to each cluster's centre, with their
# neighbours in the original text (the token itself in ⟦…⟧). What the clusters mean is
# read off these examples: for a byte-level model trained on code and prose, groups
# such as "inside an identifier", "after whitespace or newline", "punctuation" are
# typical.

# %%
n_clusters = 4
labels = cluster(res, n_clusters=n_clusters)
sizes = labels.to_series().value_counts().sort_index()
print("cluster sizes:", sizes.to_dict())
assert sizes.sum() == n_probe and len(sizes) == n_clusters
examples = cluster_examples(res, labels, k=4, context=8)
cols = [c for c in ("cluster", "rank", "dataset", "context") if c in examples.columns]
with pd.option_context("display.max_colwidth", 60):
    print(examples[cols].to_string(index=False))

# %%
fig = plots.pca_scatter(res, color_by=labels)
fig.set_size_inches(5, 4)
plt.show()

# %% [markdown]
# ## Head-role scores beside the susceptibilities
#
# Susceptibilities come from weights and losses alone. Classic mechanistic scores come
# from attention patterns: how much a head attends to the previous token, to itself, to
# the first token, and on repeated random sequences, whether it behaves like an
# **induction** head (attends to the token after the previous occurrence of the current
# one) or a **duplicate-token** head. `run_demo` stores them in `head_roles.nc`; each
# score is an average attention weight, so it lies in [0, 1]. Setting them beside the PCA
# loadings asks whether the response matrix recovers these roles without being told.

# %%
with xr.open_dataset(out / "head_roles.nc", engine="netcdf4") as f:
    roles = f.load()
role_table = roles.to_dataframe().drop(columns=["layer", "head"], errors="ignore")
role_table = role_table.loc[[h for h in role_table.index if h in heads]]
side_by_side = pd.concat([role_table, loadings.add_prefix("PC")], axis=1)
for name in roles.data_vars:
    values = roles[name].values
    assert np.all((values >= -1e-9) & (values <= 1 + 1e-9)), name
side_by_side  # noqa: B018

# %% [markdown]
# ## Where next
#
# * `bayes-susc demo --out runs/demo` runs the same pipeline from the command line and
#   writes a self-contained `report.html` (heat map, PCA, clusters with examples,
#   convergence per head, traces, head roles).
# * Longer chains turn `rhat`/`ess` flags into usable entries; `bayes-susc calibrate`
#   (tutorial 03) checks the step size first.
# * Your own model: tutorial 04.

# %%
workdir.cleanup()
