"""The side-by-side benchmark's agreement machinery against devinterp, at a tiny size.

Runs ``benchmarks.vs_devinterp.run_benchmark`` on a 1-layer, 2-head TransformerLens model
(d_model 32, 32-token sequences), one head plus the unrestricted run, 4 chains × 150
draws on both sides, and checks that bayes_susc's renormalized χ agrees with devinterp's
``susceptibilities()`` output: the peer's numbers are reproduced from its own draws, and
the two sides' per-token χ correlate and mostly lie inside the combined Monte Carlo
interval. ε = 5e-3 (not the benchmark's 1e-3) so that 150 draws mix well enough for a
per-token comparison; both sides use the same ε. Takes ≈ 30 s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tl_compat import hooked_transformer_lens

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed

needs_peer = pytest.mark.skipif(
    importlib.util.find_spec("devinterp") is None
    or importlib.util.find_spec("transformer_lens") is None,
    reason="needs the benchmark extra: pip install -c constraints.txt -e '.[bench]' "
    "(devinterp 2.0.1 and TransformerLens 3.x)",
)


def tiny_config():
    from benchmarks.vs_devinterp import FULL

    return dataclasses.replace(
        FULL,
        n_layers=1,
        n_heads=2,
        d_model=32,
        d_head=8,
        n_ctx=32,
        seq_len=32,
        train_steps=100,
        batch_size=8,
        num_train_batches=10,
        num_probe=8,
        num_draws=150,
        step_size=5e-3,
        heads=("L0H1",),
    )


@needs_peer
def test_renormalized_chi_agrees_with_devinterp(tmp_path):
    hooked_transformer_lens()  # the benchmark's model: skips under TransformerLens 4.x
    from benchmarks.vs_devinterp import run_benchmark

    results = run_benchmark(tiny_config(), tmp_path)  # one thread: tests/conftest.py
    json.dumps(results)  # what the script writes must be JSON
    agree = results["agreement"]
    assert agree["entries"] == 8 * 31
    # The peer's χ is exactly its estimator applied to its own stored draws.
    assert agree["peer_output_reproduced_max_abs_err"] < 1e-5
    assert agree["pearson_r"] > 0.9
    assert agree["fraction_within_combined_95"] > 0.8
    assert results["speedup"] > 0


def test_our_side_on_two_workers_gives_the_in_process_matrix(tmp_path):
    """`--workers 2`: the same response matrix as our in-process side, bit for bit."""
    hooked_transformer_lens()  # the benchmark's model: skips under TransformerLens 4.x
    import xarray as xr

    from bayes_susc.sampling.executor import ProcessExecutor
    from benchmarks.vs_devinterp import make_problem, run_ours

    cfg = dataclasses.replace(tiny_config(), num_draws=20, heads=("L0H0", "L0H1"))
    problem = make_problem(cfg, tmp_path)
    local = run_ours(problem, cfg)
    with ProcessExecutor(2, threads_per_worker=1) as pool:
        remote = run_ours(problem, cfg, executor=pool)
    assert list(remote["seconds_per_component"]) == ["full", "L0H0", "L0H1"]
    xr.testing.assert_identical(remote["matrix"], local["matrix"])


@pytest.mark.parametrize(
    ("device", "match"),
    [("tpu:0", "--device: "), ("cuda", "this torch build sees no CUDA device")],
)
def test_device_argument_is_checked_before_anything_runs(device, match, capsys, tmp_path):
    """A device this torch cannot use stops the script with a usage error naming
    ``--device``, before any model is built or file written."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    from benchmarks.vs_devinterp import main

    with pytest.raises(SystemExit) as stopped:
        main(["--device", device, "--skip-peer", "--quick", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
