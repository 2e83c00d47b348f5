"""Runs to a convergence target through the pipeline (issue 19): the rounds extend the
components below the target from their saved state, so every component file equals one
uninterrupted fixed-length run of its final length, bit for bit; an interrupted run
resumes to the same files; the budget and the draw cap stop it and say so; bad settings
fail before sampling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bayes_susc.storage.draws as draws_module
from bayes_susc.cli import app
from bayes_susc.errors import ConfigError
from bayes_susc.pipeline.config import _until_settings  # noqa: PLC2701
from bayes_susc.pipeline.run import run
from bayes_susc.pipeline.spec import (
    EstimationSettings,
    RunSpec,
    SamplingSettings,
    UntilConverged,
)
from bayes_susc.storage.draws import get_group, load
from bayes_susc.target.components import Component


class Line(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -0.3, 0.8]))


def squared_error(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-item squared error (x @ a − 1)²."""
    return (x @ model.a - 1.0) ** 2


COMPONENTS = (
    Component("a0", {"a": (0,)}),
    Component("a1", {"a": (1,)}),
    Component("a2", {"a": (2,)}),
)


def _spec(until: UntilConverged | None, num_draws: int = 20) -> RunSpec:
    g = torch.Generator().manual_seed(0)
    return RunSpec(
        name="line",
        model=Line(),
        model_description="a line",
        loss_fn=squared_error,
        train_data=[torch.randn(8, 3, generator=g) for _ in range(3)],
        eval_data=torch.randn(8, 3, generator=g),
        probe_data=torch.randn(12, 3, generator=g),
        probe_coords={"dataset": ["probe"] * 12},
        components=COMPONENTS,
        sampling=SamplingSettings(
            hyperparameters={"step_size": 2e-3},
            num_chains=2,
            num_draws=num_draws,
            num_burnin=5,
            seed=3,
            until=until,
        ),
        # Small thresholds, so that some components pass after a few rounds and others
        # need more: the rounds must extend only those below the target.
        estimation=EstimationSettings(min_ess=40.0, min_draws=60, max_rhat=1.02),
    )


UNTIL = UntilConverged(fraction=1.0, round_draws=15, max_draws=95)


def _posterior(path: Path) -> dict[str, dict[str, np.ndarray]]:
    data = load(path)
    return {
        g: {k: np.asarray(v.values) for k, v in get_group(data, g).data_vars.items()}
        for g in ("posterior", "sample_stats")
    }


def _assert_same(a: dict, b: dict) -> None:
    for group in a:
        assert sorted(a[group]) == sorted(b[group])
        for key in a[group]:
            np.testing.assert_array_equal(a[group][key], b[group][key], err_msg=f"{group}.{key}")


def _read(out: Path) -> dict:
    return json.loads((out / "convergence.json").read_text())


def test_rounds_extend_components_below_target_to_the_draws_of_one_long_run(tmp_path):
    summary = run(_spec(UNTIL), tmp_path / "u")
    conv = _read(tmp_path / "u")
    assert conv == summary["convergence"]
    page = (tmp_path / "u" / "report.html").read_text()
    assert f"{100 * conv['fraction_converged']:.1f} %</b> of entries converged" in page
    assert (tmp_path / "u" / "figures" / "convergence_rounds.png").is_file()
    rounds = conv["rounds"]
    assert len(rounds) >= 3, rounds
    finals = conv["draws_per_chain"]
    # Draws grow only for components below the target in the round before.
    for before, after in zip(rounds, rounds[1:]):
        for name, n in after["draws_per_chain"].items():
            grown = name in before["components_below_target"]
            assert n == before["draws_per_chain"][name] + (15 if grown else 0), (name, before)
    assert len(set(finals.values())) > 1, "every component ended at the same length"
    last = rounds[-1]
    if conv["reached"]:
        assert last["fraction_converged"] >= 1.0 and conv["reason"] == "target reached"
    else:
        assert conv["reason"] == "max_draws reached"
        assert all(finals[n] + 15 > 95 for n in last["components_below_target"])
        assert conv["estimated_draws_per_chain"] >= max(finals.values())
    # Each component equals a fixed-length run of its final length, bit for bit.
    for name, n in finals.items():
        fixed = tmp_path / f"fixed{n}"
        if not fixed.exists():
            run(_spec(None, num_draws=n), fixed, report=False)
        _assert_same(
            _posterior(tmp_path / "u" / "components" / f"{name}.nc"),
            _posterior(fixed / "components" / f"{name}.nc"),
        )
    # The summary's settled share is the statuses' share.
    counts = summary["response_matrix"]["status_counts"]
    settled = sum(counts.get(k, 0) for k in ("ok", "ci_contains_zero", "not_significant_bh"))
    assert summary["response_matrix"]["settled_fraction"] == settled / (12 * 3)


def test_an_interrupted_run_resumes_to_the_same_files(tmp_path, monkeypatch):
    run(_spec(UNTIL), tmp_path / "whole", report=False)
    real_save, calls = draws_module.save, []

    def save_then_die(data, path):
        real_save(data, path)
        calls.append(path)
        if len(calls) == 5:  # in the second round, after one extension was saved
            raise KeyboardInterrupt

    monkeypatch.setattr(draws_module, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(_spec(UNTIL), tmp_path / "cut", report=False)
    monkeypatch.setattr(draws_module, "save", real_save)
    summary = run(_spec(UNTIL), tmp_path / "cut", report=False)
    whole, cut = _read(tmp_path / "whole"), summary["convergence"]
    assert cut["draws_per_chain"] == whole["draws_per_chain"]
    assert cut["reason"] == whole["reason"]
    assert [r["fraction_converged"] for r in cut["rounds"]][-1] == (
        whole["rounds"][-1]["fraction_converged"]
    )
    for c in COMPONENTS:
        _assert_same(
            _posterior(tmp_path / "cut" / "components" / f"{c.name}.nc"),
            _posterior(tmp_path / "whole" / "components" / f"{c.name}.nc"),
        )


def test_budget_stops_after_the_first_round_and_says_what_it_would_need(tmp_path):
    lines: list[str] = []
    until = dataclasses.replace(UNTIL, time_budget=1e-3)
    summary = run(_spec(until), tmp_path, report=False, log=lines.append)
    conv = summary["convergence"]
    assert conv["reason"] == "time budget spent" and not conv["reached"]
    assert len(conv["rounds"]) == 1 and set(conv["draws_per_chain"].values()) == {20}
    # 60 pooled draws over 2 chains need at least 30 per chain.
    assert conv["estimated_draws_per_chain"] >= 30
    assert any(line.startswith("stopped: time budget spent") for line in lines)


def test_a_fixed_length_folder_is_not_extended_and_says_why(tmp_path):
    run(_spec(None), tmp_path, report=False)
    lines: list[str] = []
    summary = run(_spec(UNTIL), tmp_path, report=False, log=lines.append)
    assert summary["convergence"]["draws_per_chain"] == {"a0": 20, "a1": 20, "a2": 20}
    assert any("cannot be extended" in line for line in lines)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"round_draws": 0}, "round_draws"),
        ({"max_draws": 0}, "max_draws"),
        ({"time_budget": -1.0}, "time_budget"),
        ({"time_budget": float("nan")}, "time_budget"),
    ],
)
def test_bad_until_settings_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        UntilConverged(**kwargs)


def test_max_draws_below_the_first_round_is_refused():
    with pytest.raises(ValueError, match=r"until.max_draws \(10\) must be at least num_draws"):
        SamplingSettings(num_draws=20, until=UntilConverged(max_draws=10))
    with pytest.raises(TypeError, match="until must be an UntilConverged"):
        SamplingSettings(until={"fraction": 0.9})
    with pytest.raises(ConfigError, match=r"\[until.max_draws\] \(10\) must be at least"):
        _until_settings({"enabled": True, "fraction": 0.9, "round_draws": 5, "max_draws": 10}, 20)
    with pytest.raises(ConfigError, match=r"\[until\] fraction must be in \(0, 1\]"):
        _until_settings({"enabled": True, "fraction": 2.0, "round_draws": 5, "max_draws": 10}, 5)


def test_demo_default_kernel_is_the_one_the_kernel_study_names():
    """The demo samples with the setting the committed study recommends
    (diagnostics/reports/kernels_heads); the published preset is the papers' SGLD for a
    fixed 4 x 200 draws."""
    from bayes_susc.demo.preset import DemoSettings

    report = Path(__file__).parents[1] / "diagnostics" / "reports" / "kernels_heads"
    named = json.loads((report / "results.json").read_text())["recommendation"]["setting"]
    measured = DemoSettings()
    options = ", ".join(f"{k}={v:g}" for k, v in measured.kernel_options)
    assert f"{measured.kernel}(step_size={measured.step_size:g}, {options})" == named
    assert measured.until
    published = DemoSettings.published()
    assert (published.kernel, published.step_size, published.until) == ("sgld", 1e-3, False)
    assert (published.num_chains, published.num_draws, published.num_burnin) == (4, 200, 100)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fixed-length", "--budget", "5"], "--budget applies to --until-converged"),
        (["--budget", "0"], "--budget"),
        (["--draws", "0"], "--draws"),
        (["--preset", "fastest"], "must be 'measured' or 'published'"),
    ],
)
def test_bad_cli_options_exit_2_before_sampling(tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--out", str(tmp_path / "o"), "--workers", "1", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o" / "components").exists() or not any(
        (tmp_path / "o" / "components").iterdir()
    )


def test_a_config_with_an_until_table_samples_in_rounds(tmp_path):
    """`bayes-susc run` with [until]: rounds through the same pipeline; --fixed-length's
    override turns them off; a bad [until] key is named before sampling."""
    config = tmp_path / "run.toml"
    config.write_text(
        'name = "t"\n[model]\nkind = "hf"\nmodel_type = "gpt2"\n'
        "[model.config]\nn_layer = 1\nn_head = 2\nn_embd = 8\nvocab_size = 256\n"
        "n_positions = 16\nbos_token_id = 0\neos_token_id = 0\n"
        '[data]\nsource = "stdlib_mixed"\nseq_len = 8\nn_train = 4\nbatch_size = 4\n'
        "n_eval = 2\nn_probe = 1\n[sampling]\nnum_draws = 4\nnum_burnin = 0\nnum_chains = 2\n"
        "[estimate]\nmin_draws = 0\nmin_ess = 1000.0\n"
        "[until]\nfraction = 0.5\nround_draws = 2\nmax_draws = 8\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    conv = _read(tmp_path / "u")
    # ESS >= 1000 cannot pass with 2 x 8 draws: rounds of 2 draws up to the cap.
    assert conv["reason"] == "max_draws reached"
    assert [r["draws_per_chain_max"] for r in conv["rounds"]] == [4, 6, 8]
    assert "sampled to a target: max_draws reached after 3 round(s)" in result.output
    # --fixed-length overrides the table: the spec then has no target.
    from bayes_susc.pipeline.config import prepare, spec_from_config

    overrides = {"until": {"enabled": False}}  # what --fixed-length passes
    assert spec_from_config(prepare(config, overrides=overrides)).sampling.until is None
    config.write_text(config.read_text().replace("fraction = 0.5", "fractoin = 0.5"))
    bad = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2
    assert "unknown key 'fractoin' in [until]" in bad.output
