"""The induction-probe study (``python -m diagnostics.induction_probes``): its probe design
is what the report says it is, and the quick run writes a report with finite numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diagnostics/ is not installed
from diagnostics import induction_probes as study  # noqa: E402


@pytest.mark.parametrize("posterior_data", ["natural", "training"])
def test_probe_design(posterior_data):
    data = study._data(posterior_data, n_natural=3, n_repeat=5, seed=0)
    probe, coords = data["probe"], data["coords"]
    assert probe.shape == (8, 64)
    repeated = probe[3:]
    # Two copies of a 32-token block of distinct printable bytes.
    assert torch.equal(repeated[:, :32], repeated[:, 32:])
    assert all(len(set(row[:32].tolist())) == 32 for row in repeated)
    assert int(repeated.min()) >= 32 and int(repeated.max()) <= 126
    groups = study._groups(coords)
    sizes = {k: int(v.sum()) for k, v in groups.items()}
    # Predicted tokens 1..63 of each window; the second copy (positions 32..63) is
    # predictable by induction only, the first (1..31) not at all.
    assert sizes == {"natural": 3 * 63, "repeat, first copy": 5 * 31, "repeat, second copy": 5 * 32}
    assert not np.any(groups["natural"] & groups["repeat, second copy"])
    if posterior_data == "training":
        # The model's training mixture: 4 of each batch of 16 rows are a block of 4..32
        # distinct printable bytes tiled over the row (np.resize), the rest natural text.
        def tiled(row: list[int]) -> bool:
            return any(
                len(set(row[:n])) == n and all(row[k] == row[k % n] for k in range(64))
                for n in range(4, 33)
            )

        counts = [sum(tiled(row.tolist()) for row in batch) for batch in data["train"]]
        assert counts == [4] * len(data["train"])
        assert sum(map(tiled, data["eval"].tolist())) == 4


@pytest.mark.slow
def test_quick_study_writes_a_report(tmp_path):
    results = study.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("# Do susceptibilities")
    assert (tmp_path / "induction_contrast.png").stat().st_size > 0
    for setting in results["settings"]:
        assert set(setting["heads"]) == set(study.QUICK_HEADS)
        for head in setting["heads"].values():
            for group in ("natural", "repeat, first copy", "repeat, second copy"):
                entry = head[group]
                assert entry["ci_low"] <= entry["chi"] <= entry["ci_high"]
    assert set(results["joint"]) == {"L1H2+L1H4"}
    assert set(results["circuits"]) == {f"L1H2.{part}" for part in study.CIRCUITS}
    assert set(results["strong_gamma"]) == {"L1H2"}


def test_joint_component_is_the_union_of_its_heads():
    from bayes_susc.demo.model import AttnOnlyTransformer, head_components
    from bayes_susc.demo.train_demo import demo_config

    model = AttnOnlyTransformer(demo_config(), generator=0)
    by_name = {c.name: c.resolve(model) for c in head_components(model)}
    joint = study.joint_component(model, "pair", ("L1H2", "L1H4")).resolve(model)
    assert joint.dim == by_name["L1H2"].dim + by_name["L1H4"].dim
    assert joint.param_names == by_name["L1H2"].param_names
    for k in range(len(joint.param_names)):
        union = torch.cat([by_name["L1H2"].flat_indices[k], by_name["L1H4"].flat_indices[k]])
        assert torch.equal(joint.flat_indices[k], torch.sort(union).values)


def test_circuits_partition_their_head():
    """QK and OV of a head are disjoint and together free exactly the head's entries."""
    from bayes_susc.demo.model import AttnOnlyTransformer, head_components
    from bayes_susc.demo.train_demo import demo_config

    model = AttnOnlyTransformer(demo_config(), generator=0)
    heads = {c.name: c.resolve(model) for c in head_components(model)}
    for name in study.PROBED_HEADS:
        parts = {c.name: c.resolve(model) for c in study.circuit_components(model, (name,))}
        qk, ov = parts[f"{name}.QK"], parts[f"{name}.OV"]
        # OV's weights without the value bias, and W_O alone, sit inside OV.
        assert parts[f"{name}.W_O"].dim < parts[f"{name}.OV-weights"].dim < ov.dim
        assert qk.dim + ov.dim == heads[name].dim
        assert not set(qk.param_names) & set(ov.param_names)
        entries = {
            (p, int(i))
            for part in (qk, ov)
            for p, idx in zip(part.param_names, part.flat_indices)
            for i in idx
        }
        whole = heads[name]
        assert entries == {
            (p, int(i)) for p, idx in zip(whole.param_names, whole.flat_indices) for i in idx
        }
