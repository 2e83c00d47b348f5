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
# # 04 · Your own model
#
# Tutorials 01–03 used models the package builds for you. This one shows what you write
# for your own network:
#
# 1. a **Hugging Face GPT-2-family model** — here a tiny one built from a local
#    `transformers.GPT2Config` with random initialization (nothing is downloaded),
#    briefly trained on a toy copying task;
# 2. **components**: its attention heads and MLPs from `bayes_susc.target.architectures`, and a
#    custom boolean mask;
# 3. **probes**: per-token probes versus probe *data sets*, and why the two agree;
# 4. a **plain `nn.Module`** with components picked by parameter name, and a
#    **user-registered kernel**;
# 5. **saving and reloading** draws and response matrices.
#
# As in every tutorial, the numbers the prose states are asserted, so the notebook is a
# test (`BAYES_SUSC_FAST=1` shrinks the runs).

# %%
import os
import tempfile
import time
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import pandas as pd
import torch
import transformers
import xarray as xr

import bayes_susc
from bayes_susc.estimation.response_matrix import (
    build_response_matrix,
    load_response_matrix,
    save_response_matrix,
)
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.kernels.base import GradFn, NoiseSource, gradient_info
from bayes_susc.pipeline.config import causal_lm_loss
from bayes_susc.target import architectures

FAST = os.environ.get("BAYES_SUSC_FAST", "") not in ("", "0")
# Fast mode keeps the GPT-2 runs short (about 20 ms per step for 4 vectorized chains on
# one CPU thread) and samples three components, not seven; the numbers asserted do not
# depend on it.
GPT_DRAWS, GPT_STEPS_PER_DRAW, GPT_BURNIN = (30, 1, 30) if FAST else (400, 2, 200)
NUM_DRAWS = 200 if FAST else 400
torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps timings stable
pd.set_option("display.float_format", lambda x: f"{x: .3g}")
transformers.logging.set_verbosity_error()
T0 = time.perf_counter()
print(f"fast mode: {FAST}; transformers {transformers.__version__}")

# %% [markdown]
# ## 1. A GPT-2 from a config
#
# `AutoModelForCausalLM.from_config(GPT2Config(...))` builds the architecture (a
# `GPT2LMHeadModel`) with random weights and needs no network access. Two notes for
# sampling:
#
# * `attn_implementation="eager"`: the sampler evaluates all chains at once with
#   `torch.func.vmap`; PyTorch's fused CPU attention kernel has no vmap rule and would
#   fall back to a slow loop over chains.
# * float64 is not required; the tiny model here is float32, as real models are.
#
# The data: sequences of 16 tokens from a vocabulary of 24, whose second half repeats
# the first. The first half is unpredictable (loss ≈ log 24 per token at best); the
# second half can be predicted perfectly by a head that looks back 8 positions and
# copies. A few hundred Adam steps teach the model some of that. The local posterior is
# centred on *these* trained weights.

# %%
VOCAB, HALF = 24, 8
config = transformers.GPT2Config(
    vocab_size=VOCAB,
    n_positions=2 * HALF,
    n_embd=32,
    n_layer=2,
    n_head=2,
    bos_token_id=0,  # GPT-2's default ids (50256) lie outside a 24-token vocabulary
    eos_token_id=0,
)
torch.manual_seed(0)
gpt = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def copy_sequences(n: int, seed: int) -> torch.Tensor:
    """n sequences (n, 2·HALF): HALF random tokens, then the same tokens again."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, VOCAB, (n, HALF), generator=g)
    return torch.cat([first, first], dim=1)


train_tokens = copy_sequences(256, seed=1)
opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
gpt.train()
for _ in range(200 if FAST else 600):
    batch = train_tokens[torch.randint(0, 256, (32,))]
    opt.zero_grad()
    causal_lm_loss(gpt, batch).mean().backward()
    opt.step()
gpt.eval()

eval_tokens = copy_sequences(32, seed=2)
with torch.no_grad():
    per_token = causal_lm_loss(gpt, eval_tokens)  # (batch, positions - 1), nats
first_half, second_half = per_token[:, : HALF - 1].mean(), per_token[:, HALF:].mean()
print(f"loss on the random half {first_half:.2f} nats (log {VOCAB} = {np.log(VOCAB):.2f})")
print(f"loss on the copied half {second_half:.2f} nats")
assert second_half < 0.5 * first_half  # the model has learned to copy, at least partly

# %% [markdown]
# The loss function is the one contract with the library: `loss_fn(model, batch)` must
# return **unreduced per-item losses** — every element is an item. For a language model
# an item is one predicted token; `bayes_susc.pipeline.config.causal_lm_loss` computes the
# next-token cross-entropy for Hugging Face models (it reads `.logits`) and for models
# that return logits directly. Its output has shape (batch, positions − 1).
#
# ## 2. Components
#
# `bayes_susc.target.architectures` knows where each head's weights live in GPT-2's fused
# `c_attn` (columns [Q | K | V]) and `c_proj` (rows per head). A head of width
# e = d_model / n_head = 16 owns 3·d·e query/key/value weights, 3·e biases and e·d output
# rows: 3·32·16 + 3·16 + 16·32 = 2,096 entries. An MLP owns all of `mlp.c_fc` and
# `mlp.c_proj` (4d·d + 4d + d·4d + d = 8,352 entries).
#
# Any other set of entries is a boolean mask (`architectures.by_mask`) — here, the
# embedding rows of the tokens 0–3, a "which tokens" component — or parameter names /
# a regular expression (`by_parameters`, `by_regex`). Everything not selected stays
# frozen bit for bit.

# %%
heads = architectures.attention_heads(gpt)
mlps = architectures.mlps(gpt)
mask = torch.zeros(VOCAB, 32, dtype=torch.bool)
mask[:4] = True
rows = architectures.by_mask("wte_tokens_0_3", {"transformer.wte.weight": mask}, model=gpt)
dims = {c.name: c.resolve(gpt).dim for c in heads + mlps + [rows]}
print(dims)
d, e = 32, 16
assert [c.name for c in heads] == ["L0H0", "L0H1", "L1H0", "L1H1"]
assert all(dims[c.name] == 3 * d * e + 3 * e + e * d for c in heads)
assert all(dims[c.name] == 4 * d * d + 4 * d + 4 * d * d + d for c in mlps)
assert dims["wte_tokens_0_3"] == 4 * d
# Heads of a layer partition c_attn's and c_proj's weight (the shared c_proj bias aside).
print(heads[0].resolve(gpt).describe())
components = [heads[0], heads[3], rows] if FAST else heads + mlps + [rows]

# %% [markdown]
# ## 3. Sampling every component, and two kinds of probes
#
# **Per-token probes.** `probe_data` is a batch of sequences; since the loss returns one
# value per predicted token, every token is a probe item, and `probe_coords` labels
# them (here: the sequence, the position and which half it is in). A response matrix
# row is one token.
#
# **Probe data sets.** Often the question is about a *distribution*: "random tokens" vs
# "copied tokens". Its susceptibility is the mean of its items' χ — and the estimator is
# linear in the same way, exactly (the loss differences are averaged over the set's
# items before the covariance, which is algebraically identical).
# `estimate(..., groups="half")` returns one row per data set. (Alternatively pass each
# data set's batches as `probe_data` of its own run; the per-token route keeps both
# views from one run.)

# %%
probe_tokens = copy_sequences(4, seed=3)
n_seq, n_pos = probe_tokens.shape[0], probe_tokens.shape[1] - 1
position = np.tile(np.arange(1, n_pos + 1), n_seq)  # position of the predicted token
probe_coords = {
    "sequence": np.repeat(np.arange(n_seq), n_pos),
    "position": position,
    "half": np.where(position >= HALF, "copied", "random"),
}
train_batches = list(train_tokens.split(32))
runs, posteriors = {}, {}
start = time.perf_counter()
for comp in components:
    posteriors[comp.name] = bayes_susc.LocalPosterior(
        gpt, causal_lm_loss, train_batches, comp, nbeta=30.0, gamma=300.0
    )
    runs[comp.name] = bayes_susc.sample(
        posteriors[comp.name],
        "sgld",
        eval_data=eval_tokens,
        probe_data=probe_tokens,
        probe_coords=probe_coords,
        num_chains=4,
        num_draws=GPT_DRAWS,
        num_burnin=GPT_BURNIN,
        steps_per_draw=GPT_STEPS_PER_DRAW,
        step_size=1e-3,
        seed=0,
        progress=False,
    )
print(f"sampled {len(runs)} components in {time.perf_counter() - start:.1f} s")
draws = bayes_susc.get_group(runs["L1H1"], "posterior")
print(dict(draws["probe_loss"].sizes), "probe items:", n_seq * n_pos)
assert draws["probe_loss"].sizes["probe"] == n_seq * n_pos

# %% [markdown]
# Sampling never touches the model's own weights: the chains live in the sampler's flat
# coordinates and the network is evaluated functionally. After all these runs the model
# is bit-identical to the trained one.

# %%
for name, p in gpt.named_parameters():
    for post in posteriors.values():
        if name in post.anchors:
            assert torch.equal(p.detach(), post.anchors[name]), name
print("model weights unchanged after sampling")

# %% [markdown]
# The response matrix (rows: tokens, columns: components) with intervals and a status per
# entry, and the data-set view of the same draws. The linearity check compares the
# data-set χ with the mean of its tokens' χ: equal to rounding.

# %%
matrix = build_response_matrix(runs)
print(matrix["status"].to_series().value_counts())
by_half = {name: estimate(run, groups="half") for name, run in runs.items()}
table = pd.DataFrame({name: ds["chi"].to_series() for name, ds in by_half.items()}).T.rename_axis(
    "component"
)
for name, ds in by_half.items():
    for label in ("random", "copied"):
        items = matrix["chi"].sel(component=name).values[probe_coords["half"] == label]
        chi_set = float(ds["chi"].sel(probe=label))
        np.testing.assert_allclose(chi_set, items.mean(), rtol=1e-9, atol=1e-15)
table  # noqa: B018

# %% [markdown]
# ## 4. A plain `nn.Module` and a kernel of your own
#
# Nothing above is specific to transformers. For any module, components are parameter
# names (`by_parameters`, `by_regex`, `parameter_components`) or masks; the loss returns
# per-item losses. Here: a two-layer tanh network classifying points in the plane, with
# one component per layer.
#
# A **kernel** is two functions: `init(position, grad_fn, noise)` returns a state (a
# `NamedTuple` of `(chains, dim)` tensors) and `step(state, grad_fn, noise)` returns the
# new state and per-step statistics. Register a factory under a name and configs and
# `sample` can use it. As an example we write SGLD in the *Langevin* convention
# v ← v − ε'∇U + √(2ε') ξ, which many texts use, and check the step-size conversion of
# the docs: it is the package's Welling–Teh SGLD, v ← v − (ε/2)∇U + √ε ξ, with
# ε' = ε/2 — so with the same seed (the same noise ξ, the same minibatch order) the two
# give the same draws. Note what a paper's "ε = 0.001" means before copying it.


# %%
class LangevinState(NamedTuple):
    position: torch.Tensor  # (chains, dim)


class LangevinSGLD:
    """v ← v − ε'∇U + √(2ε') ξ: SGLD in the Langevin-form convention (ε' = ε/2).

    Args:
        step_size: ε' (> 0).
    """

    name: ClassVar[str] = "langevin_sgld"
    full_batch: ClassVar[bool] = False  # minibatch gradients are fine

    def __init__(self, step_size: float = 5e-4) -> None:
        self.step_size = float(step_size)

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> LangevinState:
        return LangevinState(position)

    def step(self, state: LangevinState, grad_fn: GradFn, noise: NoiseSource):
        res = grad_fn(state.position)  # potential, grad and loss, each per chain
        xi = noise.normal(state.position.shape[-1])
        eps = self.step_size
        new = state.position - eps * res.grad + (2 * eps) ** 0.5 * xi
        return LangevinState(new), gradient_info(res)


bayes_susc.register_kernel("langevin_sgld", LangevinSGLD, overwrite=True)
print("kernels:", bayes_susc.available_kernels())

# %%
g = torch.Generator().manual_seed(0)
points = torch.randn(400, 2, generator=g)
labels = ((points[:, 0] * points[:, 1]) > 0).long()  # XOR-like quadrants
net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
opt = torch.optim.Adam(net.parameters(), lr=0.02)
for _ in range(400):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(points[:300]), labels[:300]).backward()
    opt.step()


def cross_entropy(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")  # (batch,)


print("parameters:", [n for n, _ in net.named_parameters()])
hidden = architectures.by_regex("hidden", net, r"^0\.")  # 0.weight, 0.bias
readout = architectures.by_parameters("readout", ["2.weight", "2.bias"])
net_batches = [(points[i : i + 50], labels[i : i + 50]) for i in range(0, 300, 50)]
net_post = bayes_susc.LocalPosterior(net, cross_entropy, net_batches, hidden)
common = dict(
    eval_data=(points[300:350], labels[300:350]),
    probe_data=(points[350:], labels[350:]),
    num_chains=4,
    num_draws=NUM_DRAWS,
    num_burnin=100,
    seed=0,
    progress=False,
)
ours = bayes_susc.sample(net_post, "langevin_sgld", step_size=5e-4, **common)
builtin = bayes_susc.sample(net_post, "sgld", step_size=1e-3, **common)
phi_ours = bayes_susc.get_group(ours, "posterior")["phi"].values
phi_builtin = bayes_susc.get_group(builtin, "posterior")["phi"].values
print("largest |difference| of phi draws:", np.abs(phi_ours - phi_builtin).max())
np.testing.assert_array_equal(phi_ours, phi_builtin)
attrs_kernel = bayes_susc.get_group(ours, "posterior").attrs
print({k: v for k, v in attrs_kernel.items() if "kernel" in k})

# %% [markdown]
# The draws are identical bit for bit: halving and doubling are exact in binary floating
# point, so ε'·∇U and (ε/2)·∇U, √(2ε') and √ε are the same numbers. The run's
# attributes record the kernel's name and hyperparameters, so the result says how it
# was made.
#
# ## 5. Saving and reloading
#
# `bayes_susc.save` writes one run (all groups: draws, sampler statistics, constant
# data, attributes) to netCDF atomically — a crash never leaves half a file — and
# `bayes_susc.load` reads it back fully into memory. Response matrices have their own
# pair, `save_response_matrix` / `load_response_matrix`, which keep string statuses and
# token coordinates. Both round trips are exact.

# %%
with tempfile.TemporaryDirectory() as tmp:
    run_path = bayes_susc.save(runs["L1H1"], Path(tmp) / "L1H1.nc")
    back = bayes_susc.load(run_path)
    matrix_path = save_response_matrix(matrix, Path(tmp) / "matrix.nc")
    matrix_back = load_response_matrix(matrix_path)
    print(
        f"{run_path.name}: {run_path.stat().st_size / 1e3:.0f} kB, "
        f"{matrix_path.name}: {matrix_path.stat().st_size / 1e3:.0f} kB"
    )
for group in ("posterior", "sample_stats"):
    xr.testing.assert_identical(
        bayes_susc.get_group(back, group), bayes_susc.get_group(runs["L1H1"], group)
    )
xr.testing.assert_identical(matrix_back, matrix)
# Estimates from reloaded draws are the estimates from the original draws.
np.testing.assert_array_equal(estimate(back)["chi"].values, estimate(runs["L1H1"])["chi"].values)
print("round trips exact")
print(f"tutorial ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Where next
#
# * The same model from the command line: `bayes-susc run examples/tiny_gpt2.toml`
#   describes model, data, components, sampler and estimator in TOML (schema in
#   `bayes_susc/pipeline/config.py`), resumes finished components and writes a report.
# * Before a long run, `bayes-susc calibrate` or `bayes_susc.checks.calibration.calibrate`
#   picks ε (tutorial 03).
# * TransformerLens `HookedTransformer`, GPT-NeoX/Pythia and Llama-family models
#   (grouped-query attention included) are supported by the same
#   `architectures.attention_heads` / `mlps` / `embeddings` helpers.
