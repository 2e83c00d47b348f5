"""The shipped demo checkpoint (bayes_susc/demo/demo_model.safetensors) and its training
script: config, documented head-role figures, and the training batches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bayes_susc.demo.corpus import corpus_bytes, mixed_corpus
from bayes_susc.demo.model import AttnOnlyTransformer, next_token_loss
from bayes_susc.demo.preset import DEMO_CHECKPOINT
from bayes_susc.demo.train_demo import (
    ROLE_VOCAB,
    TrainRecipe,
    demo_config,
    demo_role_scores,
    load_checkpoint,
    save_checkpoint,
    train_demo,
    training_batch,
)

META = json.loads(DEMO_CHECKPOINT.with_suffix(".json").read_text())

# The demo's corpus is the running Python's standard library (its source and pydoc
# prose), and the figures in demo_model.json were logged on Python 3.11. Other versions
# ship different text: on Python 3.12 the evaluation loss moves by 0.004 nats and the
# head-role scores by up to 0.021, so there the figures hold to a corpus tolerance.
ON_REFERENCE_PYTHON = sys.version_info[:2] == (3, 11)
LOSS_ATOL = 1e-3 if ON_REFERENCE_PYTHON else 0.02
ROLE_ATOL = 2e-4 if ON_REFERENCE_PYTHON else 0.05


@pytest.fixture(scope="module")
def shipped() -> AttnOnlyTransformer:
    return load_checkpoint(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def roles(shipped):
    return demo_role_scores(shipped)


def test_checkpoint_is_small_safetensors_with_the_demo_config(shipped):
    assert DEMO_CHECKPOINT.stat().st_size < 500_000  # ~0.3 MB of float32 weights
    cfg = shipped.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.n_ctx, cfg.d_vocab) == (
        2,
        8,
        64,
        16,
        64,
        256,
    )
    assert cfg.layernorm and cfg == demo_config()
    state = load_file(str(DEMO_CHECKPOINT))  # plain tensors, no pickle
    assert set(state) == set(shipped.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not shipped.training
    # Trained, not an initialization: natural code+prose at well under the uniform
    # log(256) = 5.55 nats/token (the recipe's logged evaluation set).
    tokens, _ = mixed_corpus(64, 64, seed=2)
    with torch.no_grad():
        loss = next_token_loss(shipped, tokens).mean().item()
    assert loss == pytest.approx(META["eval_loss"], abs=LOSS_ATOL)
    assert loss < 1.8


def test_head_roles_reproduce_the_documented_figures(roles):
    for name in ("induction", "previous_token", "duplicate_token"):
        want = [META["head_roles"][name][str(c)] for c in roles["component"].values]
        np.testing.assert_allclose(roles[name].values, want, atol=ROLE_ATOL, err_msg=name)
    ind = roles["induction"].values.reshape(2, 8)
    prev = roles["previous_token"].values.reshape(2, 8)
    # Induction heads in layer 1 only: the best layer-1 head attends >= 0.3 of its mass
    # (uniform attention gives ~0.02) and beats every layer-0 head by > 0.3.
    assert ind[1].max() >= 0.3
    assert ind[1].max() > ind[0].max() + 0.3
    assert ind[0].max() < 0.05
    assert (ind[1] >= 0.3).sum() >= 2
    # A previous-token head in layer 0, above every layer-1 head (uniform: ~0.06).
    assert prev[0].max() >= 0.3
    assert prev[0].max() > prev[1].max() + 0.05


def test_training_batch_mixes_repeated_blocks_and_corpus_windows():
    recipe = TrainRecipe(batch_size=16, repeat_fraction=0.25, min_block=4, max_block=32)
    batch = training_batch(np.random.default_rng(0), recipe, 64)
    assert batch.shape == (16, 64) and batch.dtype == torch.long
    again = training_batch(np.random.default_rng(0), recipe, 64)
    assert torch.equal(batch, again)
    code, prose = (corpus_bytes(k).tobytes() for k in ("code", "prose"))
    repeated = 0
    for row in batch.numpy():
        text = row.astype(np.uint8).tobytes()
        if text in code or text in prose:
            continue
        # Otherwise: a block of L distinct printable bytes tiled over the row.
        period = next(p for p in range(4, 33) if np.array_equal(row[p:], row[:-p]))
        assert len(set(row[:period].tolist())) == period
        assert set(row.tolist()) <= set(ROLE_VOCAB)
        repeated += 1
    assert repeated == 4


def test_train_demo_is_deterministic_and_checkpoints_round_trip(tmp_path):
    recipe = TrainRecipe(steps=6, batch_size=4, warmup=2)
    logs: list[str] = []
    a, hist = train_demo(recipe, log_every=3, log=logs.append)
    b, _ = train_demo(recipe, log_every=3, log=lambda s: None)
    assert hist["step"] == [0, 3, 6] and len(logs) == 3
    assert "induction L0" in logs[-1]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert hist["loss"][-1] < hist["loss"][0]  # six steps already lower the loss
    path = tmp_path / "m.safetensors"
    save_checkpoint(a, path, {"note": 1})
    c = load_checkpoint(path)
    assert json.loads(path.with_suffix(".json").read_text())["note"] == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


# Heads of the separation test: the two strongest induction heads of the shipped model
# (L1H2 0.74, L1H4 0.69) and two layer-0 heads (L0H4 is the previous-token head).
SEPARATION_HEADS = ("L0H0", "L0H4", "L1H2", "L1H4")


def test_pca_of_the_response_matrix_separates_the_induction_heads(roles, shipped):
    """PC2 of a small response matrix puts the two top induction heads apart from the rest.

    Budget (30-60 s on 2 shared cores): 4 heads, the demo's sampler settings (SGLD,
    ε = 1e-3, nβ = 30, γ = 300, 4 chains x (50 burn-in + 200 draws)), 8 natural code+prose
    probe windows (504 tokens), the demo's evaluation set (16 windows), 64 training
    windows in batches of 16; the report's PCA (column-standardized, all entries).
    Measured ``induction_separation`` margin on PC2 (gap over the largest absolute
    loading): 1.03 with sampler seed 0 (this test); over the loadings' range, as first
    measured, 0.848, 0.870 and 0.539 with seeds 0, 1, 2 — the largest absolute loading is
    at most that range on a PC with loadings of both signs, so those margins are lower
    bounds. Threshold 0.4.

    What this does *not* show (measured): with the weak-induction layer-1 heads L1H3
    (score 0.00) and L1H6 (0.11) added to the rest, no PC separates the top two at 200
    draws (best margins -0.07..0.05 over two seeds): PC2 then splits layer 1 from layer 0.
    At this budget the PCA separates the layer that holds the induction heads, not the
    induction heads within it.
    """
    from bayes_susc.demo.model import head_components
    from bayes_susc.estimation.response_matrix import build_response_matrix, pca
    from bayes_susc.report.html import induction_separation
    from bayes_susc.sampling.driver import sample
    from bayes_susc.target.posterior import LocalPosterior

    ind = roles["induction"]
    top2 = [str(c) for c in ind["component"].values[np.argsort(-ind.values)[:2]]]
    assert sorted(top2) == ["L1H2", "L1H4"]
    probe, _ = mixed_corpus(8, 64, seed=2)
    train_tokens, _ = mixed_corpus(64, 64, seed=0)
    eval_tokens, _ = mixed_corpus(16, 64, seed=1)
    by_name = {c.name: c for c in head_components(shipped)}
    runs = {}
    for name in SEPARATION_HEADS:
        posterior = LocalPosterior(
            shipped,
            next_token_loss,
            list(train_tokens.split(16)),
            by_name[name],
            nbeta=30.0,
            gamma=300.0,
        )
        runs[name] = sample(
            posterior,
            "sgld",
            step_size=1e-3,
            eval_data=eval_tokens,
            probe_data=probe,
            num_chains=4,
            num_draws=200,
            num_burnin=50,
            seed=0,
            progress=False,
        )
    matrix = build_response_matrix(runs, seed=0)
    assert matrix["chi"].shape == (8 * 63, 4)
    loadings = pca(matrix, n_components=3, weights=None)["loadings"]
    margin = induction_separation(loadings.transpose("component", "pc"), ind, n_top=2)
    assert float(margin.sel(pc=2)) >= 0.4, margin.values


def test_demo_copies_the_shipped_model_and_checks_settings(tmp_path):
    from bayes_susc.demo.preset import DemoSettings, run_demo, trained_demo_model

    model = trained_demo_model(tmp_path / "run", DemoSettings())
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == DEMO_CHECKPOINT.read_bytes()
    shipped = load_checkpoint(DEMO_CHECKPOINT)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), shipped.state_dict().values())
    )
    with pytest.raises(ValueError, match="shipped demo model has"):
        trained_demo_model(tmp_path / "other", DemoSettings(n_heads=4))
    with pytest.raises(ValueError, match=r"heads \['L2H0'\] are not demo heads"):
        run_demo(tmp_path / "run", DemoSettings(heads=("L1H2", "L2H0")), report=False)
    # A summary.json round trip gives a list; the settings keep a tuple.
    assert DemoSettings(heads=["L0H0"]).heads == ("L0H0",)
    assert DemoSettings().n_probe * (DemoSettings().seq_len - 1) >= 4000
