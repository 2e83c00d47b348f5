"""The run folder's promises (issue 17, points 7-10 and 13): a resume never reuses stale
results, one writer at a time, one diverged component does not sink the matrix, clean
errors with exit code 2, Ctrl-C says what was kept, a missing extra is named.

The runs use a two-parameter-vector model whose sampling takes a fraction of a second, so
each promise is checked on a real run of the one pipeline (bayes_susc.pipeline.run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bayes_susc.cli import app
from bayes_susc.errors import RunFolderBusy, RunFolderError
from bayes_susc.pipeline.lock import LOCK_NAME
from bayes_susc.pipeline.run import run
from bayes_susc.pipeline.spec import RunSpec, SamplingSettings
from bayes_susc.storage.draws import get_group, load
from bayes_susc.target.components import Component


class TwoVectors(nn.Module):
    """A linear regression on ``a`` plus a term in ``b`` that is finite only at b = b*:
    sampling ``b`` diverges at its first step (the gradient of sqrt at 0 is infinite)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -0.3]))
        self.b = nn.Parameter(torch.tensor([0.2]))


def regression_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-item squared error (x @ a − 1)², plus sqrt(−|b − 0.2|) (0 at the anchor)."""
    return (x @ model.a - 1.0) ** 2 + torch.sqrt(-(model.b - 0.2).abs()).sum()


def _data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "train_data": [torch.randn(8, 2, generator=g) for _ in range(2)],
        "eval_data": torch.randn(8, 2, generator=g),
        "probe_data": torch.randn(6, 2, generator=g),
    }


A0 = Component.from_parameters("a0", ["a"])
A1 = Component("a1", {"a": (1,)})


def _spec(components=(A0, A1), *, seed: int = 0, data_seed: int = 0, model=None) -> RunSpec:
    data = _data(data_seed)
    return RunSpec(
        name="tiny",
        model=model if model is not None else TwoVectors(),
        model_description="two vectors",
        loss_fn=regression_loss,
        probe_coords={"dataset": ["probe"] * 6},
        components=components,
        sampling=SamplingSettings(
            hyperparameters={"step_size": 1e-3}, num_chains=2, num_draws=30, num_burnin=5, seed=seed
        ),
        **data,
    )


def _arrays(path: Path) -> dict:
    post = get_group(load(path), "posterior")
    return {k: post[k].values for k in post.data_vars}


# ---------------------------------------------------------------- 7: no stale results
def test_resume_reuses_only_a_matching_run(tmp_path):
    first = run(_spec(), tmp_path, report=False)
    assert first["computed_this_run"] == ["a0", "a1"] and first["reused"] == []
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "components").glob("*.nc")}
    said = []
    again = run(_spec(), tmp_path, report=False, log=said.append)
    assert again["computed_this_run"] == [] and again["reused"] == ["a0", "a1"]
    assert said == [f"resuming {tmp_path}: reusing 2 finished components of 2 (a0, a1); sampling 0"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "components").glob("*.nc")} == (
        mtimes
    )
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["sampling"]["seed"] == 0 and info["sampling"]["kernel.step_size"] == 1e-3
    assert info["components"]["a1"] == {"a": [1]}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "sampling seed: 0 -> 1"),
        ({"data_seed": 1}, "the data (train, eval or probe)"),
        ({"components": (A0, Component("a1", {"a": (0,)}))}, "the definition of component a1"),
    ],
)
def test_resume_with_any_difference_stops_before_sampling(tmp_path, change, named):
    run(_spec(), tmp_path, report=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "components").glob("*.nc")}
    with pytest.raises(RunFolderError, match="Use --restart") as refused:
        run(_spec(**change), tmp_path, report=False)
    assert named in str(refused.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "components").glob("*.nc")} == before


def test_changed_weights_are_named_and_restart_recomputes(tmp_path):
    run(_spec(), tmp_path, report=False)
    recorded = json.loads((tmp_path / "run_info.json").read_text())["weights_fingerprint"]
    model = TwoVectors()
    with torch.no_grad():
        model.a[0] += 1e-6
    with pytest.raises(RunFolderError, match="the model's weights"):
        run(_spec(model=model), tmp_path, report=False)
    said = []
    redone = run(_spec(model=model), tmp_path, report=False, restart=True, log=said.append)
    assert said == [f"--restart: discarding the results in {tmp_path}"]
    assert redone["computed_this_run"] == ["a0", "a1"] and redone["reused"] == []
    now = json.loads((tmp_path / "run_info.json").read_text())["weights_fingerprint"]
    assert now != recorded


def test_truncated_component_file_is_named_and_recomputed(tmp_path):
    run(_spec(), tmp_path, report=False)
    path = tmp_path / "components" / "a1.nc"
    want = _arrays(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a killed write
    said = []
    summary = run(_spec(), tmp_path, report=False, log=said.append)
    assert any(m.startswith("components/a1.nc cannot be read") for m in said), said
    assert summary["computed_this_run"] == ["a1"] and summary["reused"] == ["a0"]
    got = _arrays(path)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# ------------------------------------------------------------------------ 8: the lock
def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from bayes_susc.pipeline.lock import run_folder_lock\n"
            "with run_folder_lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(RunFolderBusy, match=f"in use by process {holder.pid} on "):
            run(_spec(), tmp_path, report=False)
        assert time.perf_counter() - start < 5  # refused, not waited for
        assert list((tmp_path / "components").glob("*")) == []  # nothing sampled
    finally:
        holder.kill()
        holder.wait()
    # The holder's death releases the lock: the folder is usable again.
    assert run(_spec(), tmp_path, report=False)["computed_this_run"] == ["a0", "a1"]
    assert (tmp_path / LOCK_NAME).read_text() == ""


# --------------------------------------------------------- 9: a diverged component
def test_diverged_component_gets_its_column_flagged_and_the_rest_estimated(tmp_path):
    b = Component.from_parameters("b", ["b"])
    with pytest.warns(Warning, match="diverged"):
        summary = run(_spec((A0, b, A1)), tmp_path)
    m = __import__("xarray").open_dataset(tmp_path / "response_matrix.nc", engine="netcdf4")
    with m:
        status = m["status"].load()
        chi = m["chi"].load()
        n_div = m["num_diverged_chains"].load()
    assert set(np.unique(status.sel(component="b").values)) == {"diverged"}
    assert int(n_div.sel(component="b")) == 2
    assert np.isnan(chi.sel(component="b").values).all()
    for name in ("a0", "a1"):
        assert "diverged" not in set(status.sel(component=name).values)
        assert np.isfinite(chi.sel(component=name).values).all()
    assert summary["components"]["b"]["diverged_chains"] == 2
    assert summary["response_matrix"]["shape"] == [6, 3]
    assert (tmp_path / "report.html").is_file()


# ----------------------------------------------------- 10 and 13: the command line
def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_output_folder_that_is_a_file_exits_2(tmp_path):
    target = tmp_path / "taken"
    target.write_text("")
    result = _cli("demo", "--quick", "--out", str(target), "--no-progress", "--workers", "1")
    assert result.exit_code == 2, result.output
    assert f"error: the output folder {target} is a file" in result.output
    assert "Traceback" not in result.output


def test_output_folder_that_cannot_be_created_exits_2():
    result = _cli("demo", "--quick", "--out", "/proc/bayes-susc-run", "--no-progress")
    assert result.exit_code == 2, result.output
    assert "error: cannot create the output folder /proc/bayes-susc-run" in result.output


def _config(tmp_path: Path, extra: str = "", model: str | None = None) -> Path:
    model = model or 'kind = "hf"\nmodel_type = "gpt2"\n'
    path = tmp_path / "run.toml"
    path.write_text(
        f'name = "t"\n{extra}\n[model]\n{model}\n'
        "[model.config]\nn_layer = 1\nn_head = 2\nn_embd = 8\nvocab_size = 256\n"
        "n_positions = 16\nbos_token_id = 0\neos_token_id = 0\n"
        '[data]\nsource = "stdlib_mixed"\nseq_len = 8\nn_train = 4\nbatch_size = 4\n'
        "n_eval = 2\nn_probe = 1\n[sampling]\nnum_draws = 2\nnum_burnin = 0\nnum_chains = 2\n"
    )
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_exits_2_before_anything(tmp_path):
    result = _cli("run", str(_config(tmp_path, 'device = "cuda"')), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert "error: 'device' = 'cuda' is not available" in result.output
    assert not (tmp_path / "o" / "run_info.json").exists()


def test_missing_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
    result = _cli("run", str(_config(tmp_path)), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert "pip install 'bayes_susc[models]'" in result.output
    assert "Traceback" not in result.output and "ModuleNotFoundError" not in result.output


def test_pickled_checkpoint_in_run_folder_is_refused(tmp_path):
    torch.save({"weights": {}, "extra": object()}, tmp_path / "model.pt")
    result = _cli("demo", "--quick", "--out", str(tmp_path), "--no-progress", "--workers", "1")
    assert result.exit_code == 2, result.output
    assert "model.pt holds pickled Python objects" in result.output
    assert "weights_only=False" not in result.output  # torch's hint is not passed on


def test_ctrl_c_names_the_kept_components_and_the_resume_command(tmp_path, monkeypatch):
    import bayes_susc.demo.preset as preset

    def interrupted(spec, out, **_):
        (Path(out) / "components" / "L0H0.nc").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(preset, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["bayes-susc", "demo", "--quick", "--out", str(tmp_path)])
    result = _cli("demo", "--quick", "--out", str(tmp_path), "--workers", "1")
    assert result.exit_code == 130
    assert f"Kept 1 finished component in {tmp_path / 'components'}: L0H0" in result.output
    assert f"bayes-susc demo --quick --out {tmp_path}" in result.output


# ------------------------------------------- issue 18: a stuck chain is named as such
def test_stuck_mala_chain_is_named_in_health_and_status(tmp_path):
    """MALA with a step far too large rejects every proposal: φ never moves. The status
    says ``stuck`` (before R-hat, which would otherwise take the blame)."""
    spec = _spec((A0, A1))
    stuck = RunSpec(
        **{
            **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "sampling": SamplingSettings(
                kernel="mala", hyperparameters={"step_size": 50.0}, num_chains=2, num_draws=30
            ),
        }
    )
    run(stuck, tmp_path, report=False)
    health = json.loads((tmp_path / "analyses" / "health.json").read_text())
    assert health["a0"]["stuck"] == "fail"
    import xarray as xr

    with xr.open_dataset(tmp_path / "response_matrix.nc", engine="netcdf4") as m:
        assert set(m["status"].values.ravel()) == {"stuck"}
        assert m["stuck"].values.tolist() == [True, True]


def test_stuck_chains_exactly():
    from bayes_susc.checks.health import stuck_chains

    phi = np.array([[0.1, 0.1, 0.1], [0.1, 0.2, 0.1], [np.nan] * 3, [0.3, 0.3, 0.3 + 1e-17]])
    assert stuck_chains(phi).tolist() == [True, False, False, True]  # 0.3 + 1e-17 == 0.3
    phi[3, 2] = 0.3000001
    assert stuck_chains(phi).tolist() == [True, False, False, False]
    acceptance = np.array([[0.5] * 3, [0.001, 0.0, 0.02], [0.5] * 3, [0.2] * 3])
    assert stuck_chains(phi, acceptance).tolist() == [True, True, False, False]
