"""Response matrix: statuses, Benjamini–Hochberg, netCDF round trip, standardization,
weighted PCA and clustering, on synthetic matrices (no sampling)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
from scipy.stats import norm
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from statsmodels.stats.multitest import multipletests

from bayes_susc.estimation import response_matrix as rm
from bayes_susc.estimation.response_matrix import STATUS_REASONS

DIMS = ("probe", "component")
pytestmark = pytest.mark.filterwarnings(
    # well-separated planted groups make a disconnected k-NN graph; that is expected here
    "ignore:Graph is not fully connected:UserWarning"
)


def make_matrix(chi, se=None, *, num_diverged=None, coords=None) -> xr.Dataset:
    """A response matrix as estimate_many would return it, with healthy diagnostics."""
    chi = np.asarray(chi, dtype=float)
    n_probe, n_comp = chi.shape
    se = np.full_like(chi, 0.01) if se is None else np.asarray(se, dtype=float)
    z = norm.ppf(0.975)
    data = {
        "chi": chi,
        "se": se,
        "ci_low": chi - z * se,
        "ci_high": chi + z * se,
        "p_value": 2 * norm.sf(np.abs(chi) / se),
        "rhat": np.full_like(chi, 1.001),
        "ess_bulk": np.full_like(chi, 1000.0),
        "ess_tail": np.full_like(chi, 800.0),
        "mcse": se / 10,
    }
    ds = xr.Dataset(
        {k: (DIMS, v) for k, v in data.items()},
        coords={"probe": np.arange(n_probe), "component": [f"L0H{j}" for j in range(n_comp)]},
        attrs={"method": "block_bootstrap", "confidence": 0.95},
    )
    nd = np.zeros(n_comp, dtype=int) if num_diverged is None else np.asarray(num_diverged)
    ds["num_diverged_chains"] = ("component", nd)
    if coords:
        ds = ds.assign_coords({k: ("probe", np.asarray(v)) for k, v in coords.items()})
    return ds


def planted(n_per=20, n_comp=8, noise=0.3, seed=0):
    """Three groups of probes, each with its own component profile, plus noise."""
    rng = np.random.default_rng(seed)
    profiles = 2.0 * rng.standard_normal((3, n_comp))
    truth = np.repeat(np.arange(3), n_per)
    chi = profiles[truth] + noise * rng.standard_normal((3 * n_per, n_comp)) + 5.0
    return chi, truth


# ------------------------------------------------------------------ statuses


def _flag_bias(ds, i, j):
    if "bias_exceeds_interval" not in ds:
        ds["bias_exceeds_interval"] = xr.zeros_like(ds["chi"], dtype=bool)
    ds["bias_exceeds_interval"].values[i, j] = True


def _flag_component(name):
    def flag(ds, i, j):
        if name not in ds:
            ds[name] = ("component", np.zeros(ds.sizes["component"], dtype=bool))
        ds[name].values[j] = True

    return flag


TRIGGERS = {
    "diverged": lambda ds, i, j: ds["num_diverged_chains"].values.__setitem__(j, 1),
    "unstable": _flag_component("unstable"),
    "low_acceptance": _flag_component("low_acceptance"),
    "stuck": _flag_component("stuck"),
    "loss_anchor": _flag_component("loss_anchor"),
    "nonfinite": lambda ds, i, j: ds["chi"].values.__setitem__((i, j), np.nan),
    "rhat": lambda ds, i, j: ds["rhat"].values.__setitem__((i, j), 1.2),
    "ess": lambda ds, i, j: ds["ess_tail"].values.__setitem__((i, j), 20.0),
    "step_size_bias": lambda ds, i, j: _flag_bias(ds, i, j),
    "ci_contains_zero": lambda ds, i, j: ds["ci_low"].values.__setitem__((i, j), -1.0),
    "not_significant_bh": lambda ds, i, j: ds["p_value"].values.__setitem__((i, j), 0.9),
}


def test_too_few_draws_fail_the_ess_check():
    """A component with fewer kept draws than min_draws gets 'ess' on every entry, even
    with a large ESS (the coverage study: ESS estimates from 4 x 100 draws overstate)."""
    ds = make_matrix(3.0 + np.zeros((5, 4)))
    ds["num_draws"] = ("component", np.array([800, 799, 400, 4000]))
    out = rm.assign_status(ds)
    assert out.attrs["min_draws"] == 800
    np.testing.assert_array_equal(
        out["status"].values[0], np.array(["ok", "ess", "ess", "ok"], dtype=object)
    )
    assert (rm.assign_status(ds, min_draws=400)["status"].values[:, 2] == "ok").all()
    with pytest.raises(ValueError, match="min_draws"):
        rm.assign_status(ds, min_draws=-1)


@pytest.mark.parametrize("k", range(len(STATUS_REASONS)))
def test_first_reason_wins(k):
    """An entry failing reason k and every later check gets reason k."""
    rng = np.random.default_rng(k)
    ds = make_matrix(3.0 + rng.random((5, 4)))
    i, j = 2, 1
    for reason in STATUS_REASONS[k:]:
        TRIGGERS[reason](ds, i, j)
    out = rm.assign_status(ds)
    assert out["status"].values[i, j] == STATUS_REASONS[k]
    others = np.ones((5, 4), dtype=bool)
    if STATUS_REASONS[k] in ("diverged", "unstable", "low_acceptance", "stuck", "loss_anchor"):
        others[:, j] = False  # the whole component is flagged
        assert (out["status"].values[:, j] == STATUS_REASONS[k]).all()
    else:
        others[i, j] = False
    assert (out["status"].values[others] == "ok").all()
    np.testing.assert_array_equal(out["reliable"].values, out["status"].values == "ok")


def test_each_reason_on_crafted_entries():
    rng = np.random.default_rng(0)
    ds = make_matrix(2.0 + rng.random((6, 4)))
    ds["num_diverged_chains"].values[3] = 2
    ds["chi"].values[3, 3] = np.nan  # diverged component: diverged wins
    ds["se"].values[0, 0] = np.inf  # nonfinite
    ds["rhat"].values[0, 0] = 1.5  # ... still nonfinite
    ds["rhat"].values[1, 0] = 1.02  # rhat
    ds["ess_bulk"].values[1, 0] = 5.0  # ... still rhat
    ds["rhat"].values[2, 0] = np.nan  # undefined R-hat fails
    ds["ess_bulk"].values[3, 0] = 99.0  # ess
    ds["ess_tail"].values[4, 0] = np.nan  # undefined ESS fails
    ds["ci_low"].values[0, 1], ds["p_value"].values[0, 1] = -0.1, 0.3  # ci_contains_zero
    ds["p_value"].values[1, 1] = 0.2  # not_significant_bh (interval still excludes 0)
    out = rm.assign_status(ds, min_ess=100, max_rhat=1.01, fdr=0.05)
    s = out["status"].values
    assert (s[:, 3] == "diverged").all()
    assert s[0, 0] == "nonfinite"
    assert s[1, 0] == "rhat" and s[2, 0] == "rhat"
    assert s[3, 0] == "ess" and s[4, 0] == "ess"
    assert s[0, 1] == "ci_contains_zero"
    assert s[1, 1] == "not_significant_bh"
    assert s[5, 0] == "ok" and (s[2:, 1] == "ok").all() and (s[:, 2] == "ok").all()
    assert out["reliable"].dtype == bool and out["reliable"].sum() == (s == "ok").sum() > 0
    assert out.attrs["min_ess"] == 100 and out.attrs["max_rhat"] == 1.01
    assert out.attrs["fdr"] == 0.05 and out.attrs["method"] == "block_bootstrap"
    np.testing.assert_array_equal(
        out["ess"].values, np.minimum(ds["ess_bulk"].values, ds["ess_tail"].values)
    )
    # thresholds are arguments: a laxer R-hat bound clears (1, 0)'s R-hat, exposing its ESS
    assert rm.assign_status(ds, max_rhat=1.05)["status"].values[1, 0] == "ess"
    assert rm.assign_status(ds, min_ess=50)["status"].values[3, 0] == "ok"


def test_bh_matches_statsmodels():
    rng = np.random.default_rng(3)
    chi = rng.standard_normal((30, 5)) * 0.03  # a mix of null and non-null entries
    ds = make_matrix(chi)
    ds["chi"].values[0, 0] = np.nan  # outside the BH family
    out = rm.assign_status(ds, fdr=0.1)
    p = ds["p_value"].values
    family = np.ones(p.shape, dtype=bool)
    family[0, 0] = False
    reject, q, _, _ = multipletests(p[family], alpha=0.1, method="fdr_bh")
    np.testing.assert_allclose(out["q_value"].values[family], q, rtol=0, atol=0)
    assert np.isnan(out["q_value"].values[0, 0])
    status = out["status"].values[family]
    # with healthy diagnostics, "not_significant_bh" is exactly the BH non-rejection among
    # entries whose interval excludes zero
    excl = ~((ds["ci_low"].values <= 0) & (ds["ci_high"].values >= 0))[family]
    np.testing.assert_array_equal(status[excl] == "not_significant_bh", ~reject[excl])
    assert 0 < (status == "ok").sum() < status.size


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_ess": -1.0}, "min_ess"),
        ({"max_rhat": 0.99}, "max_rhat"),
        ({"max_rhat": float("nan")}, "max_rhat"),
        ({"fdr": 0.0}, "fdr"),
        ({"fdr": 1.5}, "fdr"),
    ],
)
def test_threshold_validation(kwargs, name):
    ds = make_matrix(np.ones((2, 2)))
    with pytest.raises(ValueError, match=name):
        rm.assign_status(ds, **kwargs)
    with pytest.raises(ValueError, match=name):  # checked before estimating anything
        rm.build_response_matrix({}, **kwargs)


def test_matrix_validation():
    ds = make_matrix(np.ones((2, 2)))
    with pytest.raises(ValueError, match="p_value"):
        rm.assign_status(ds.drop_vars("p_value"))
    with pytest.raises(ValueError, match="ess"):
        rm.assign_status(ds.drop_vars("ess_tail"))
    bad = ds.copy(deep=True)
    bad["p_value"].values[0, 0] = 1.5
    with pytest.raises(ValueError, match="p_value"):
        rm.assign_status(bad)


def test_build_response_matrix_calls_estimate_many(monkeypatch):
    import bayes_susc.estimation.susceptibility as susc

    seen = {}

    def fake_estimate_many(runs, **kwargs):
        seen["runs"], seen["kwargs"] = runs, kwargs
        return make_matrix(np.full((3, 2), 2.0))

    monkeypatch.setattr(susc, "estimate_many", fake_estimate_many, raising=False)
    out = rm.build_response_matrix({"a": 1, "b": 2}, min_ess=10, confidence=0.9)
    assert seen == {"runs": {"a": 1, "b": 2}, "kwargs": {"confidence": 0.9}}
    assert (out["status"] == "ok").all() and out.attrs["min_ess"] == 10


# ------------------------------------------------------------------ files


def test_netcdf_round_trip_is_identical(tmp_path):
    rng = np.random.default_rng(1)
    tokens = ["def", " f", "(", "\n", "é", " ", "x", ""]
    ds = make_matrix(
        rng.standard_normal((8, 3)) * 0.05,
        num_diverged=[0, 1, 0],
        coords={
            "dataset": ["code"] * 4 + ["prose"] * 4,
            "sequence": [0, 0, 0, 0, 1, 1, 1, 1],
            "position": [0, 1, 2, 3, 0, 1, 2, 3],
            "token": tokens,
        },
    )
    ds["rhat"].values[0, 0] = np.nan
    ds = rm.assign_status(ds)
    path = tmp_path / "sub" / "matrix.nc"
    assert rm.save_response_matrix(ds, path) == path
    back = rm.load_response_matrix(path)
    xr.testing.assert_identical(back, ds)
    assert back["status"].dtype.kind == "U" and back["reliable"].dtype == bool
    # overwrite in place, no temporary files left behind; the loaded data outlive the file
    rm.save_response_matrix(ds, path)
    assert os.listdir(path.parent) == ["matrix.nc"]
    path.unlink()
    assert back["chi"].sum().item() == pytest.approx(ds["chi"].sum().item())
    with pytest.raises(FileNotFoundError):
        rm.load_response_matrix(path)


# ------------------------------------------------------------------ standardization


def test_standardize_columns_and_rows():
    rng = np.random.default_rng(2)
    chi = rng.standard_normal((40, 6)) * rng.uniform(0.1, 5, 6) + rng.uniform(-3, 3, 6)
    ds = make_matrix(chi)

    z = rm.standardize(ds, weights=None)
    assert z.dims == DIMS
    np.testing.assert_allclose(z.mean("probe"), 0, atol=1e-12)
    np.testing.assert_allclose(z.std("probe", ddof=0), 1, rtol=1e-12)

    r = rm.standardize(ds, columns=False, center_rows=True, weights=None)
    np.testing.assert_allclose(r.mean("component"), 0, atol=1e-12)
    np.testing.assert_allclose(r.values, chi - chi.mean(1, keepdims=True), atol=1e-12)

    both = rm.standardize(ds, center_rows=True, weights=None)
    np.testing.assert_allclose(both.mean("component"), 0, atol=1e-12)
    np.testing.assert_allclose(both.mean("probe"), 0, atol=1e-12)
    np.testing.assert_allclose(both.values, z.values - z.values.mean(1, keepdims=True))

    same = rm.standardize(ds, columns=False, weights=None)
    np.testing.assert_array_equal(same.values, chi)


def test_standardize_uses_only_weighted_entries():
    rng = np.random.default_rng(4)
    chi = rng.standard_normal((30, 4))
    ds = make_matrix(chi)
    ds["rhat"].values[:5, 0] = 1.3
    ds["chi"].values[:5, 0] = 1e6  # huge, but flagged: must not move the column's scale
    ds = rm.assign_status(ds, fdr=0.999)
    z = rm.standardize(ds)  # weights="status"
    assert np.isnan(z.values[~ds["reliable"].values]).all()
    np.testing.assert_allclose(z.mean("probe", skipna=True), 0, atol=1e-12)
    np.testing.assert_allclose(z.std("probe", ddof=0, skipna=True), 1, rtol=1e-12)
    # equal custom weights = no weights
    ones = xr.ones_like(ds["chi"]) * 7.0
    np.testing.assert_allclose(
        rm.standardize(ds, weights=ones).values, rm.standardize(ds, weights=None).values
    )
    with pytest.raises(ValueError, match="weights"):
        rm.standardize(ds, weights=-ones)
    with pytest.raises(ValueError, match="weights"):
        rm.standardize(ds, weights="bogus")
    with pytest.raises(ValueError, match="assign_status"):
        rm.standardize(ds.drop_vars(["status", "reliable"]))


# ------------------------------------------------------------------ PCA and clustering


def test_pca_matches_sklearn_and_recovers_planted_groups():
    chi, truth = planted()
    ds = rm.assign_status(make_matrix(chi))
    assert ds["reliable"].all()
    res = rm.pca(ds, n_components=3)
    assert res["scores"].dims == ("probe", "pc") and res["loadings"].dims == ("component", "pc")
    evr = res["explained_variance_ratio"].values
    assert np.all(np.diff(evr) <= 0) and evr[:2].sum() > 0.9  # two axes separate 3 groups

    z = (chi - chi.mean(0)) / chi.std(0)
    ref = PCA(3, svd_solver="full").fit(z)
    np.testing.assert_allclose(res["scores"].values, ref.transform(z), atol=1e-10)
    np.testing.assert_allclose(res["loadings"].values, ref.components_.T, atol=1e-10)
    np.testing.assert_allclose(evr, ref.explained_variance_ratio_, rtol=1e-10)

    for method in ("kmeans", "agglomerative", "spectral"):
        labels = rm.cluster(res, 3, method=method)
        assert labels.dims == ("probe",) and set(labels.values.tolist()) == {0, 1, 2}
        assert adjusted_rand_score(truth, labels.values) >= 0.9, method
        on_rows = rm.cluster(ds, 3, method=method, on="standardized")
        assert adjusted_rand_score(truth, on_rows.values) >= 0.9, method


def test_exclusion_changes_nothing_when_all_reliable():
    chi, _ = planted(seed=5)
    ds = rm.assign_status(make_matrix(chi))
    a, b = rm.pca(ds, 2), rm.pca(ds, 2, weights=None)
    for name in ("scores", "loadings", "explained_variance_ratio", "matrix"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert a.attrs["fit_iterations"] == 0


def _abs_cos(a, b):
    return np.abs((a * b).sum(0)) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)


def test_flagged_outliers_are_removed():
    chi, truth = planted(seed=1)
    clean = rm.pca(rm.assign_status(make_matrix(chi)), 2)
    dirty = chi.copy()
    outliers = [(0, 0), (25, 3), (50, 6), (10, 5)]
    for i, j in outliers:
        dirty[i, j] += 60.0
    ds = make_matrix(dirty)
    for i, j in outliers:
        ds["rhat"].values[i, j] = 1.3
    ds = rm.assign_status(ds)
    assert (~ds["reliable"]).sum() == len(outliers)

    kept = rm.pca(ds, 2)  # weights="status": the outliers are filled in
    naive = rm.pca(ds, 2, weights=None)
    assert _abs_cos(kept["loadings"].values, clean["loadings"].values).min() > 0.999
    assert _abs_cos(naive["loadings"].values, clean["loadings"].values).min() < 0.95
    # filled-in entries lie on the rank-2 fit, so the leading ratios rise a little
    np.testing.assert_allclose(
        kept["explained_variance_ratio"], clean["explained_variance_ratio"], atol=0.02
    )
    assert adjusted_rand_score(truth, rm.cluster(kept, 3).values) >= 0.9
    # the outlier rows land near their clean scores when flagged (the filled-in value is
    # a prediction, off by about the noise), far off when not
    rows = [i for i, _ in outliers]
    ref = clean["scores"].values

    def deviation(res):
        s = res["scores"].values * np.sign((res["scores"].values * ref).sum(0))
        return np.abs(s[rows] - ref[rows]).max() / ref.std(0).max()

    assert deviation(kept) < 0.5 and deviation(naive) > 1.0
    # "converged" weights also drop them (their status is a convergence failure)
    conv = rm.pca(ds, 2, weights="converged")
    np.testing.assert_allclose(conv["scores"].values, kept["scores"].values, atol=1e-8)
    # inverse-variance weights: a huge SE down-weights the entry
    ds_se = make_matrix(dirty, se=np.where(dirty - chi > 0, 100.0, 0.01))
    inv = rm.pca(ds_se, 2, weights=1.0 / ds_se["se"] ** 2)
    assert _abs_cos(inv["loadings"].values, clean["loadings"].values).min() > 0.999


def test_fully_unreliable_probe_is_left_out():
    chi, truth = planted(seed=2)
    ds = make_matrix(chi)
    ds["ess_bulk"].values[7, :] = 3.0
    ds = rm.assign_status(ds)
    res = rm.pca(ds, 2)
    assert not res["used"].values[7] and np.isnan(res["scores"].values[7]).all()
    labels = rm.cluster(res, 3)
    assert labels.values[7] == -1
    keep = np.arange(len(truth)) != 7
    assert adjusted_rand_score(truth[keep], labels.values[keep]) >= 0.9
    with pytest.raises(ValueError, match="n_components"):
        rm.pca(ds, 9)
    with pytest.raises(ValueError, match="method"):
        rm.cluster(res, 3, method="dbscan")
    with pytest.raises(ValueError, match="n_clusters"):
        rm.cluster(res, 100)


def test_cluster_examples_with_token_context():
    chi, truth = planted(n_per=12, seed=3)
    n = len(truth)
    text = "abcdefghijkl"
    ds = make_matrix(
        chi,
        coords={
            "dataset": np.where(truth == 2, "prose", "code"),
            "sequence": truth,  # each planted group is one sequence of 12 tokens
            "position": np.tile(np.arange(12), 3),
            "token": [text[p] for p in np.tile(np.arange(12), 3)],
        },
    )
    ds = rm.assign_status(ds)
    res = rm.pca(ds, 2)
    labels = rm.cluster(res, 3)
    ex = rm.cluster_examples(res, labels, k=4, context=2)
    assert len(ex) == 12 and sorted(set(ex["cluster"])) == [0, 1, 2]
    for c, group in ex.groupby("cluster"):
        assert list(group["rank"]) == [0, 1, 2, 3]
        assert np.all(np.diff(group["distance"].to_numpy()) >= 0)
        assert (labels.values[group["probe"].to_numpy()] == c).all()
    row = ex.iloc[0]
    p = int(row["position"])
    assert row["context"] == text[max(p - 2, 0) : p] + f"⟦{text[p]}⟧" + text[p + 1 : p + 3]
    assert {"dataset", "sequence", "position", "token", "context"} <= set(ex.columns)
    # on the response matrix itself (standardized rows) it also works
    ex2 = rm.cluster_examples(ds, labels, k=1)
    assert len(ex2) == 3 and n == ds.sizes["probe"]


# ------------------------------------------------------------------ integration


def test_build_from_tiny_draws(tmp_path):
    """estimate_many on synthetic draws (no sampling) → statuses, file, PCA, examples.

    Runs are given as posterior groups (xarray Datasets, as bayes_susc.sample writes
    them); chain 2 of the last component goes non-finite (diverged) part way.
    """
    rng = np.random.default_rng(0)
    chains, draws, n_probe = 4, 300, 12
    slopes = np.linspace(-1.0, 1.0, n_probe)
    slopes[5] = 0.0  # an item no component responds to
    coords = {
        "chain": np.arange(chains),
        "draw": np.arange(draws),
        "probe": np.arange(n_probe),
        "sequence": ("probe", np.repeat([0, 1], 6)),
        "position": ("probe", np.tile(np.arange(6), 2)),
        "token": ("probe", list("abcdefghijkl")),
    }
    runs = {}
    for k in range(4):
        phi = rng.standard_normal((chains, draws))
        delta = -(k - 1.5) * slopes * phi[..., None] + 0.5 * rng.standard_normal(
            (chains, draws, n_probe)
        )
        if k == 3:
            phi[2, 100:] = np.nan
        runs[f"L0H{k}"] = xr.Dataset(
            {
                "phi": (("chain", "draw"), phi),
                "eval_loss": (("chain", "draw"), np.ones_like(phi)),
                "probe_loss": (("chain", "draw", "probe"), 1.0 + delta),
            },
            coords=coords,
        )

    ds = rm.build_response_matrix(runs, n_resamples=200, seed=1)
    assert ds.sizes == {"probe": n_probe, "component": 4}
    assert ds.attrs["confidence"] == 0.95 and ds.attrs["max_rhat"] == 1.01
    status = ds["status"].values
    assert (status[:, 3] == "diverged").all()
    assert status[5, 0] in ("ci_contains_zero", "not_significant_bh")
    assert (status == "ok").sum() >= 20
    np.testing.assert_array_equal(ds["token"].values, list("abcdefghijkl"))

    path = rm.save_response_matrix(ds, tmp_path / "matrix.nc")
    xr.testing.assert_identical(rm.load_response_matrix(path), ds)

    res = rm.pca(ds, 2)  # the diverged component has no trusted entry: left out
    assert np.isnan(res["loadings"].sel(component="L0H3")).all()
    assert np.isfinite(res["loadings"].sel(component="L0H0")).all()
    labels = rm.cluster(res, 2)
    ex = rm.cluster_examples(res, labels, k=2, context=1)
    assert ex["context"].str.contains("⟦").all()
