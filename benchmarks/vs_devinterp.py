"""Side by side with devinterp 2.0.1: per-token susceptibilities of every attention head.

One TransformerLens ``HookedTransformer`` (2 attention-only layers, 8 heads, d_model 128,
d_head 16, ctx 128, byte vocabulary), briefly trained here on
:func:`bayes_susc.demo.corpus.mixed_corpus` (cached in ``--out``), one data set, and
the same sampling problem on both sides:

- the tempered local posterior of each head (and of the whole model: both the peer's
  estimator and our ``renormalized`` one need an unrestricted run for the per-token
  means), SGLD with ε = 1e-3, nβ = 30, γ = 300, minibatches of 16 × 128 tokens, 4 chains,
  50 draws, 1 step between draws, no burn-in;
- observables at every draw: the mean loss on the evaluation batch (16 × 128 tokens) and
  the per-token loss of 16 probe sequences × 128 tokens (16 × 127 predicted tokens).

Side by side: ``devinterp.slt.susceptibilities.susceptibilities`` (chains and components
one after another, observables re-evaluated by full forward passes) against
``bayes_susc.LocalPosterior`` + ``bayes_susc.sample`` (chains vectorized) +
``bayes_susc.estimation.response_matrix.build_response_matrix(..., renormalized_from=full_run)``.
Only public bayes_susc API is used, so library speed-ups show up here unchanged.

How the two are made to sample the same posterior (read from devinterp 2.0.1's source):

- Step. devinterp's ``SGMCMC.sgld`` does ``p ← p − (lr/2)·(nβ·∇L̂_B + γ(p − p₀)) +
  √lr·N(0, 1)`` with ``L̂_B`` the *mean* per-token loss of the minibatch
  (``sample_single_chain`` back-propagates ``loss.mean()``). That is DESIGN.md §2's
  Welling–Teh form ``v ← v − (ε/2)∇U + √ε ξ``, ``U = nβ·L̂_B + (γ/2)‖v − v*‖²``, with
  ε = lr: no conversion is needed, ``lr = step_size = 1e-3``, ``n_beta = nbeta``,
  ``localization = gamma``. A head is a boolean mask per parameter (built from our
  :func:`bayes_susc.target.architectures.attention_heads`): the peer multiplies the update and
  the noise by it, so it moves exactly our component's entries.
- Minibatches. The training set is cut into ``steps`` batches of 16 sequences; the
  peer gets it with ``shuffle=False`` (it visits them in order, all chains alike) and we
  visit the same batches in our seeded per-epoch order: with steps = batches both sides
  use each batch exactly once.
- φ. The peer's φ is (mean loss of its ``sampling_task`` observable) − ``init_loss``, and
  ``init_loss`` is the loss at w* of its first ``num_init_loss_batches`` *training*
  batches, not of the evaluation set. Because the peer's estimator does not centre φ, a
  different baseline would shift its χ by a constant times E_C[ΔL_i] − m_i. So the
  evaluation batch is the first training batch on both sides and
  ``num_init_loss_batches=1``: then init_loss = L_E(w*) and both φ are
  L_E(w) − L_E(w*).
- Estimator. The peer returns ``E[φ·L_E] − E[φ·ℓ_i] + E[φ]·m_i`` with m_i = E_full[ℓ_i] −
  E_full[L_E] from its "full" run, i.e. −mean_t φ_t(ΔL_{i,t} − m_i): our ``renormalized``
  estimator with divisor n instead of n − 1. Our χ and SE are multiplied by (n − 1)/n
  before comparing.

Agreement: Pearson correlation of all (probe token, head) entries, and the fraction of
entries with |χ_ours − χ_peer| ≤ 1.96·s, s² = SE_ours² + SE_peer² + (φ̄_ours·MCSE(m_ours))²
+ (φ̄_peer·MCSE(m_peer))²: SE_ours is bayes_susc's ``ess_t`` standard error; the peer
reports no uncertainty, so SE_peer is the same ``ess_t`` standard error computed from the
peer's own draws (read back from the zarr stores it writes, after its timing stops; the
χ recomputed from them is checked against the peer's output); the last two terms are the
Monte Carlo error of each side's unrestricted-run means m_i (held fixed by both
estimators), MCSE of the mean of ΔL_i over the full run.

Work and FLOP/s: a forward pass over S sequences of T tokens costs, counting multiply-adds
as 2 FLOPs and only matmuls, S·[n_layers·(8·T·d·n·e + 4·T²·n·e) + 2·T·d·V] (Q, K, V and
O projections; the T × T scores and pattern·V, unmasked as computed; the unembedding). A
backward pass is counted as 2 forwards. The nominal work of one chain-step is one
forward + backward on the minibatch and, per draw, one forward on the evaluation batch and
one on the probe batch: 3·F(16) + (F(16) + F(16))/steps_between_draws. The same nominal
count is used for both sides, so achieved FLOP/s = nominal FLOPs / wall-clock, and the
ratio of the sides' FLOP/s is the speed-up; it is compared with this machine's float32
matmul peak, measured in the same run (best of repeated 1024³ ``torch.matmul``).

Timing: one untimed warm-up forward/backward of the model, then our side, then the peer
(``--peer-first`` swaps them); each side is timed end to end from its first call to its
susceptibilities (ours: sampling every component + building the response matrix; peer:
one ``susceptibilities()`` call, which includes writing its zarr stores). The peer's
progress bars go to ``DIR/peer_stderr.log``.

    pip install -c constraints.txt -e ".[bench]"
    python -m benchmarks.vs_devinterp [--quick] [--out DIR] [--threads N] [--workers W]
                                      [--device cpu|cuda] [--skip-peer]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_susc import LocalPosterior, get_group, sample
from bayes_susc.demo.corpus import mixed_corpus
from bayes_susc.demo.model import next_token_loss
from bayes_susc.demo.train import train
from bayes_susc.estimation.convergence import mcse_mean
from bayes_susc.estimation.response_matrix import build_response_matrix
from bayes_susc.estimation.susceptibility import estimate_many
from bayes_susc.sampling.allocator import keep_freed_memory
from bayes_susc.sampling.executor import Problem as ExecutorProblem
from bayes_susc.sampling.executor import ProcessExecutor, iter_components
from bayes_susc.target.architectures import attention_heads, by_regex
from bayes_susc.target.components import Component
from bayes_susc.target.splits import head_of

Z95 = 1.959963984540054  # two-sided 95% normal quantile for the combined interval


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class BenchConfig:
    """Model, data and sampling settings shared by both sides.

    Attributes:
        n_layers, n_heads, d_model, d_head, n_ctx, d_vocab: the TransformerLens model.
        train_steps, train_lr, train_seed: the brief AdamW training (lr in AdamW units).
        seq_len: tokens per sequence (loss items per sequence: seq_len − 1).
        batch_size: sequences per SGLD minibatch (and per observable batch).
        num_train_batches: minibatches in the sampler's training set.
        num_probe: probe sequences (per-token observables).
        step_size, nbeta, gamma: SGLD ε (Welling–Teh), nβ, γ.
        num_chains, num_draws, steps_per_draw: chains, kept draws, steps between draws.
        heads: which heads (names ``L{l}H{h}``); empty tuple = all.
        seed: sampling seed (ours: master seed; peer: ``init_seed``).
    """

    n_layers: int = 2
    n_heads: int = 8
    d_model: int = 128
    d_head: int = 16
    n_ctx: int = 128
    d_vocab: int = 256
    train_steps: int = 300
    train_lr: float = 3e-3
    train_seed: int = 0
    seq_len: int = 128
    batch_size: int = 16
    num_train_batches: int = 50
    num_probe: int = 16
    step_size: float = 1e-3
    nbeta: float = 30.0
    gamma: float = 300.0
    num_chains: int = 4
    num_draws: int = 50
    steps_per_draw: int = 1
    heads: tuple[str, ...] = ()
    seed: int = 100

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain (no burn-in)."""
        return self.num_draws * self.steps_per_draw

    def model_key(self) -> dict[str, Any]:
        """What the trained weights depend on (the cache key)."""
        keys = (
            "n_layers",
            "n_heads",
            "d_model",
            "d_head",
            "n_ctx",
            "d_vocab",
            "train_steps",
            "train_lr",
            "train_seed",
            "seq_len",
            "batch_size",
            "num_train_batches",
            "num_probe",
        )
        return {k: getattr(self, k) for k in keys}


FULL = BenchConfig()
QUICK = dataclasses.replace(
    FULL, train_steps=150, num_draws=20, num_train_batches=20, heads=("L0H0", "L1H0")
)


@dataclass
class Problem:
    """The shared model and data.

    Attributes:
        model: trained ``HookedTransformer`` (the anchor w*), eval mode.
        train_batches: ``num_train_batches`` LongTensors (batch_size, seq_len).
        eval_tokens: the evaluation batch (batch_size, seq_len) = ``train_batches[0]``.
        probe_tokens: (num_probe, seq_len), held out from training.
        probe_kinds: ``'code'``/``'prose'`` per probe sequence.
        components: the heads to compare (our ``Component`` objects).
        train_losses: AdamW minibatch losses (nats), empty when loaded from the cache.
    """

    model: torch.nn.Module
    train_batches: list[torch.Tensor]
    eval_tokens: torch.Tensor
    probe_tokens: torch.Tensor
    probe_kinds: np.ndarray
    components: list[Component]
    train_losses: list[float]


def make_model(cfg: BenchConfig) -> torch.nn.Module:
    """A fresh TransformerLens attention-only model (TransformerLens 3.x)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        seed=cfg.train_seed,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer in 3.x
        return HookedTransformer(tl_cfg)


def make_problem(cfg: BenchConfig, cache_dir: Path | None, device: str = "cpu") -> Problem:
    """Corpus, split and trained model (trained on the CPU, then moved with the tokens to
    ``device``); weights cached as ``cache_dir/model.pt``."""
    n_train = cfg.num_train_batches * cfg.batch_size
    tokens, kinds = mixed_corpus(n_train + cfg.num_probe, cfg.seq_len, seed=cfg.train_seed)
    train_tokens, probe_tokens = tokens[:n_train], tokens[n_train:]
    model = make_model(cfg)
    key = cfg.model_key()
    cache = cache_dir / "model.pt" if cache_dir is not None else None
    losses: list[float] = []
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            model.load_state_dict(saved["state_dict"])
        else:
            cache.unlink()
    if cache is None or not cache.is_file():
        losses = train(
            model, train_tokens, cfg.train_steps, cfg.batch_size, cfg.train_lr, seed=cfg.train_seed
        )
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"key": json.dumps(key, sort_keys=True), "state_dict": model.state_dict()}, cache
            )
    # requires_grad stays on: devinterp samples only parameters that require grad.
    model.eval()
    heads = attention_heads(model)
    if cfg.heads:
        by_name = {c.name: c for c in heads}
        heads = [by_name[h] for h in cfg.heads]
    model.to(device)
    batches = [b.to(device) for b in train_tokens.split(cfg.batch_size)]
    probe_tokens = probe_tokens.to(device)
    return Problem(model, batches, batches[0], probe_tokens, kinds[n_train:], heads, losses)


# ------------------------------------------------------------------------- accounting
def forward_flops(cfg: BenchConfig, n_sequences: int) -> float:
    """Matmul FLOPs of one forward pass over ``n_sequences`` × ``seq_len`` tokens."""
    t, d, ne, v = cfg.seq_len, cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_vocab
    per_layer = 8 * t * d * ne + 4 * t * t * ne
    return float(n_sequences * (cfg.n_layers * per_layer + 2 * t * d * v))


def work_per_chain_step(cfg: BenchConfig) -> dict[str, float]:
    """Nominal work of one chain-step, in minibatch-forward equivalents and in FLOPs."""
    f_batch = forward_flops(cfg, cfg.batch_size)
    observables = forward_flops(cfg, cfg.batch_size) + forward_flops(cfg, cfg.num_probe)
    flops = 3.0 * f_batch + observables / cfg.steps_per_draw
    return {
        "forward_flops_minibatch": f_batch,
        "forward_equivalents": flops / f_batch,
        "flops": flops,
    }


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(n: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    """Measured float32 matmul throughput (FLOP/s) on ``device``: best of ``repeats``
    n×n×n products (n = 4096 suits a GPU)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)  # warm-up (thread pool, allocator, CUDA context)
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


# ------------------------------------------------------------------------ our side
def _chain_method(model: torch.nn.Module, comp: Component) -> str:
    """Chains as one batch for a head (its shared-prefix split applies); one after another
    for the unrestricted run (measured at 1 thread: 76 ms per chain-step sequential
    against 95 vectorized — each replica's activations are its own and 4 at once overflow
    the caches; heads: equal within 5 %)."""
    return "vectorized" if head_of(comp.resolve(model)) is not None else "sequential"


def run_ours(
    problem: Problem,
    cfg: BenchConfig,
    verbose: bool = False,
    executor: ProcessExecutor | None = None,
) -> dict[str, Any]:
    """Sample every head and the full model with bayes_susc; the renormalized matrix.

    ``executor``: run the components side by side on its worker processes (started
    already, see :func:`run_benchmark`); ``None``: in this process, one after another.

    Returns a dict with ``seconds`` (end to end), ``seconds_per_component`` (in-process:
    each component's own time; with workers: when its result reached this process,
    from the start), ``matrix`` (the response matrix, an xarray Dataset over (probe,
    component)) and ``full_run`` (the unrestricted run's InferenceData).
    """
    model = problem.model
    kwargs = dict(
        num_chains=cfg.num_chains,
        num_draws=cfg.num_draws,
        num_burnin=0,
        steps_per_draw=cfg.steps_per_draw,
        seed=cfg.seed,
        progress=False,
        step_size=cfg.step_size,
    )
    components = [by_regex("full", model, ".*"), *problem.components]
    per_component: dict[str, float] = {}
    start = time.perf_counter()
    runs: dict[str, Any] = {}
    if executor is None:
        for comp in components:
            t0 = time.perf_counter()
            post = LocalPosterior(
                model,
                next_token_loss,
                problem.train_batches,
                comp,
                nbeta=cfg.nbeta,
                gamma=cfg.gamma,
            )
            runs[comp.name] = sample(
                post,
                "sgld",
                chain_method=_chain_method(model, comp),
                eval_data=problem.eval_tokens,
                probe_data=problem.probe_tokens,
                **kwargs,
            )
            per_component[comp.name] = time.perf_counter() - t0
            if verbose:  # partial figures survive an interrupted (long, loaded) run
                print(f"  bayes_susc {comp.name}: {per_component[comp.name]:.1f} s", flush=True)
    else:
        shared = ExecutorProblem(
            model, next_token_loss, problem.train_batches, problem.eval_tokens, problem.probe_tokens
        )
        by_method: dict[str, list[Component]] = {"sequential": [], "vectorized": []}
        for comp in components:
            by_method[_chain_method(model, comp)].append(comp)
        # Both calls submit their jobs at once; the long unrestricted run goes first.
        streams = [
            iter_components(
                shared,
                comps,
                executor=executor,
                chain_method=method,
                nbeta=cfg.nbeta,
                gamma=cfg.gamma,
                **kwargs,
            )
            for method, comps in by_method.items()
            if comps
        ]
        for stream in streams:
            for name, data in stream:
                runs[name] = data
                per_component[name] = time.perf_counter() - start
                if verbose:
                    print(f"  bayes_susc {name}: done at {per_component[name]:.1f} s", flush=True)
    synchronize(problem.eval_tokens.device)
    full = runs.pop("full")
    t0 = time.perf_counter()
    matrix = build_response_matrix(runs, renormalized_from=full)
    seconds_estimate = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "seconds_per_component": per_component,
        "seconds_estimate": seconds_estimate,
        "matrix": matrix,
        "full_run": full,
        "phi_means": {
            k: float(np.nanmean(get_group(r, "posterior")["phi"].values)) for k, r in runs.items()
        },
    }


# ----------------------------------------------------------------------- peer side
def head_masks(component: Component, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The peer's weight restriction for ``component``: parameter name -> bool mask."""
    resolved = component.resolve(model)
    params = dict(model.named_parameters())
    masks = {}
    for name, idx in zip(resolved.param_names, resolved.flat_indices):
        mask = torch.zeros(params[name].numel(), dtype=torch.bool, device=params[name].device)
        mask[idx] = True
        masks[name] = mask.reshape(params[name].shape)
    return masks


def _hf_dataset(tokens: torch.Tensor):
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": tokens.tolist()})
    ds.set_format("torch", columns=["input_ids"])
    return ds


def run_peer(problem: Problem, cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    """One ``devinterp.slt.susceptibilities.susceptibilities`` call on the same problem.

    Returns ``seconds``, ``output`` (the peer's DataTree) and ``store`` (the zarr path
    stem its per-restriction samples were written under).
    """
    from devinterp.slt.susceptibilities import susceptibilities

    if workdir.exists():
        shutil.rmtree(workdir)  # the peer returns cached results when a store exists
    workdir.mkdir(parents=True)
    model = problem.model
    train_set = _hf_dataset(torch.cat(problem.train_batches).cpu())
    observables = {
        "eval": (_hf_dataset(problem.eval_tokens.cpu()), 1),
        "probe": (_hf_dataset(problem.probe_tokens.cpu()), 1),
    }
    restrictions: dict[str, Any] = {"full": None}
    restrictions.update({c.name: head_masks(c, model) for c in problem.components})
    store = workdir / "samples.zarr"
    log = (workdir.parent / "peer_stderr.log").open("w")
    start = time.perf_counter()
    with contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = susceptibilities(
            model,
            train_set,
            observables,
            restrictions,
            sampling_task="eval",
            lr=cfg.step_size,
            n_beta=cfg.nbeta,
            localization=cfg.gamma,
            num_chains=cfg.num_chains,
            num_draws=cfg.num_draws,
            num_burnin_steps=0,
            num_steps_bw_draws=cfg.steps_per_draw,
            batch_size=cfg.batch_size,
            num_init_loss_batches=1,
            shuffle=False,
            init_seed=cfg.seed,
            device=str(problem.eval_tokens.device),
            output_path=store,
        )
    synchronize(problem.eval_tokens.device)
    seconds = time.perf_counter() - start
    log.close()
    return {"seconds": seconds, "output": output, "store": store}


def _peer_store(store: Path, name: str) -> Path:
    # devinterp appends the restriction's name to the stem of output_path
    return store.parent / f"{store.stem}_{name}{store.suffix}"


def peer_chi(problem: Problem, peer: dict[str, Any]) -> np.ndarray:
    """The peer's χ in our layout (probe item, component); probe item = seq·(T−1) + pos."""
    out = peer["output"]
    sus = out["susceptibilities"].dataset
    ctx = out["context"].dataset
    t = problem.probe_tokens.shape[1]
    rows = ctx["input_ids"].values.reshape(-1, t)
    ours = {tuple(r.tolist()): i for i, r in enumerate(problem.probe_tokens)}
    seq_of_row = np.array([ours[tuple(r.tolist())] for r in rows])
    batch = sus["batch"].values
    pos = sus["target_position"].values - 1  # target position p predicts token p
    item = seq_of_row[batch] * (t - 1) + pos
    wr = [str(w) for w in sus["wr"].values]
    chi = np.full((problem.probe_tokens.shape[0] * (t - 1), len(problem.components)), np.nan)
    for j, comp in enumerate(problem.components):
        chi[item, j] = sus["sus"].values[:, wr.index(comp.name)]
    return chi


def peer_draws(problem: Problem, peer: dict[str, Any]) -> dict[str, Any]:
    """The peer's draws read back from its zarr stores, in our probe-item order.

    Returns ``runs`` (component -> {"phi": (C, D), "delta_loss": (C, D, P)}) with the
    peer's φ (baseline: its ``init_loss``), ``m`` (P,) the full run's mean of ΔL and
    ``m_mcse`` (P,) its Monte Carlo standard error.
    """
    import xarray as xr

    def load(name: str) -> xr.Dataset:
        path = _peer_store(peer["store"], name)
        return xr.open_datatree(str(path), engine="zarr", consolidated=False).dataset

    ours = {tuple(r.tolist()): i for i, r in enumerate(problem.probe_tokens)}

    def delta(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
        e = ds["loss_eval"].values.astype(float).mean(axis=(-2, -1))  # (C, D)
        probe = ds["loss_probe"].values.astype(float)  # (C, D, batch, T-1)
        rows = ds["input_ids_probe"].values
        order = np.argsort([ours[tuple(r.tolist())] for r in rows])
        probe = probe[:, :, order].reshape(*probe.shape[:2], -1)
        return e, probe - e[..., None]

    full = load("full")
    init = float(full["init_loss"].values.astype(float).mean())
    _, full_delta = delta(full)
    runs = {}
    for comp in problem.components:
        e, d = delta(load(comp.name))
        runs[comp.name] = {"phi": e - init, "delta_loss": d}
    return {"runs": runs, "m": full_delta.mean(axis=(0, 1)), "m_mcse": mcse_mean(full_delta)}


# ------------------------------------------------------------------------ agreement
def agreement(
    problem: Problem, cfg: BenchConfig, ours: dict[str, Any], peer: dict[str, Any]
) -> dict[str, Any]:
    """Correlation and interval agreement of our renormalized χ with the peer's output."""
    names = [c.name for c in problem.components]
    n = cfg.num_chains * cfg.num_draws
    to_peer = (n - 1) / n  # the peer divides by n, our estimator by n − 1
    matrix = ours["matrix"].sel(component=names)
    chi_o = matrix["chi"].values * to_peer
    se_o = matrix["se"].values * to_peer
    chi_p = peer_chi(problem, peer)

    draws = peer_draws(problem, peer)
    re = estimate_many(draws["runs"], renormalized_from=draws["m"]).sel(component=names)
    chi_p_re = re["chi"].values * to_peer
    se_p = re["se"].values * to_peer

    # Monte Carlo error of each side's unrestricted-run means m_i (held fixed by both
    # estimators): χ moves by −φ̄·δm_i·n/(n − 1), i.e. by φ̄·δm_i on the peer's scale.
    post = get_group(ours["full_run"], "posterior")
    full_delta_o = post["probe_loss"].values - post["eval_loss"].values[..., None]
    m_mcse_o = mcse_mean(full_delta_o)
    phibar_o = np.array([ours["phi_means"][name] for name in names])
    phibar_p = np.array([draws["runs"][name]["phi"].mean() for name in names])
    s = np.sqrt(
        se_o**2
        + se_p**2
        + (phibar_o[None, :] * m_mcse_o[:, None]) ** 2
        + (phibar_p[None, :] * draws["m_mcse"][:, None]) ** 2
    )
    diff = chi_o - chi_p
    inside = np.abs(diff) <= Z95 * s
    inside_se_only = np.abs(diff) <= Z95 * np.sqrt(se_o**2 + se_p**2)
    per_head = [float(np.corrcoef(chi_o[:, j], chi_p[:, j])[0, 1]) for j in range(len(names))]
    return {
        "entries": int(chi_o.size),
        "pearson_r": float(np.corrcoef(chi_o.ravel(), chi_p.ravel())[0, 1]),
        "pearson_r_per_head_median": float(np.median(per_head)),
        "pearson_r_per_head": dict(zip(names, per_head)),
        "pearson_r_head_means": (
            float(np.corrcoef(chi_o.mean(0), chi_p.mean(0))[0, 1]) if len(names) > 2 else None
        ),
        "fraction_within_combined_95": float(inside.mean()),
        "fraction_within_se_only_95": float(inside_se_only.mean()),
        "median_abs_chi_ours": float(np.median(np.abs(chi_o))),
        "median_abs_chi_peer": float(np.median(np.abs(chi_p))),
        "median_se_ours": float(np.median(se_o)),
        "median_se_peer": float(np.median(se_p)),
        "median_abs_diff": float(np.median(np.abs(diff))),
        "mean_chi_per_head_ours": dict(zip(names, chi_o.mean(0).tolist())),
        "mean_chi_per_head_peer": dict(zip(names, chi_p.mean(0).tolist())),
        "peer_output_reproduced_max_abs_err": float(np.max(np.abs(chi_p_re - chi_p))),
        "interval": "95% normal, s^2 = se_ours^2 + se_peer^2 + (phibar*mcse(m))^2 per side",
        "chi_scale": "peer's (divisor n); ours multiplied by (n-1)/n",
        "_arrays": {"chi_ours": chi_o, "chi_peer": chi_p, "s": s},
    }


# ----------------------------------------------------------------------------- main
def run_benchmark(
    cfg: BenchConfig,
    out: Path,
    *,
    skip_peer: bool = False,
    peer_first: bool = False,
    verbose: bool = False,
    workers: int = 1,
    worker_init: Callable[[], Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Build the problem, run both sides, compare; returns the results dict (JSON-able).

    ``device``: where both sides sample (``"cpu"``, ``"cuda"``, ...): the model and every
    token tensor live there; the matmul peak is measured there.

    ``workers`` > 1: our side runs its components on that many worker processes
    (:class:`~bayes_susc.sampling.executor.ProcessExecutor`, ``torch.get_num_threads() // workers``
    threads each, ``worker_init`` called in each), started before the timing like the
    imports of this process (the start-up is reported as ``ours.workers_start_seconds``);
    the peer always runs in this process with ``torch.get_num_threads()`` threads.

    ``verbose`` prints each side's progress (per component for ours; the peer's own
    progress bars go to ``out/peer_stderr.log``).
    """
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    problem = make_problem(cfg, out, device)
    # Untimed warm-up shared by both sides: thread pool, allocator, TL's first call.
    next_token_loss(problem.model, problem.eval_tokens).mean().backward()
    problem.model.zero_grad(set_to_none=True)
    peak = matmul_peak(4096 if torch.device(device).type == "cuda" else 1024, device=device)
    components = len(problem.components) + 1  # + the unrestricted run
    chain_steps = components * cfg.num_chains * cfg.num_steps
    work = work_per_chain_step(cfg)

    def side(seconds: float) -> dict[str, float]:
        flops_s = work["flops"] * chain_steps / seconds
        return {
            "seconds": seconds,
            "ms_per_chain_step": 1e3 * seconds / chain_steps,
            "achieved_flop_per_s": flops_s,
            "fraction_of_matmul_peak": flops_s / peak,
        }

    order = ["peer", "ours"] if peer_first else ["ours", "peer"]
    raw: dict[str, Any] = {}
    pool, pool_start = None, 0.0
    if workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        pool = ProcessExecutor(workers, threads_per_worker=threads, initializer=worker_init)
        pool_start = pool.start()
    for name in order:
        if name == "peer" and skip_peer:
            continue
        if name == "ours":
            try:
                raw["ours"] = run_ours(problem, cfg, verbose, pool)
            finally:
                if pool is not None:
                    pool.shutdown()
        else:
            if verbose:
                print("  devinterp: running (progress in peer_stderr.log)", flush=True)
            raw["peer"] = run_peer(problem, cfg, out / "peer_samples")
            if verbose:
                print(f"  devinterp: {raw['peer']['seconds']:.1f} s", flush=True)
    ours = raw["ours"]
    results: dict[str, Any] = {
        "benchmark": "vs_devinterp",
        "model": (
            f"TransformerLens HookedTransformer, {cfg.n_layers} attn-only layers x "
            f"{cfg.n_heads} heads, d_model {cfg.d_model}, d_head {cfg.d_head}, "
            f"ctx {cfg.n_ctx}, vocab {cfg.d_vocab}, LayerNorm"
        ),
        "config": dataclasses.asdict(cfg),
        "components": [c.name for c in problem.components] + ["full"],
        "chain_steps_per_side": chain_steps,
        "order": order if not skip_peer else ["ours"],
        "threads": torch.get_num_threads(),
        "our_workers": workers,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if torch.device(device).type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "matmul_peak_flop_per_s": peak,
        "work_per_chain_step": work,
        "train_final_loss": (
            float(np.mean(problem.train_losses[-20:])) if problem.train_losses else None
        ),
        "versions": _versions(),
        "ours": {
            **side(ours["seconds"]),
            "seconds_per_component": ours["seconds_per_component"],
            "seconds_estimate": ours["seconds_estimate"],
            "workers_start_seconds": pool_start,
        },
    }
    if "peer" in raw:
        results["peer"] = side(raw["peer"]["seconds"])
        results["speedup"] = raw["peer"]["seconds"] / ours["seconds"]
        agree = agreement(problem, cfg, ours, raw["peer"])
        arrays = agree.pop("_arrays")
        np.savez(out / "chi.npz", **arrays)
        results["agreement"] = agree
    results["loadavg_after"] = os.getloadavg()
    return results


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("bayes_susc", "devinterp", "torch", "transformer-lens", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _print(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(f"model: {results['model']}")
    print(
        f"components: {len(results['components']) - 1} heads + full; {cfg['num_chains']} chains "
        f"x {cfg['num_draws']} draws ({cfg['steps_per_draw']} step/draw), batch "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens; eps {cfg['step_size']}, nbeta "
        f"{cfg['nbeta']}, gamma {cfg['gamma']}; {results['device_name']} ({results['device']}), "
        f"{results['threads']} threads, {results['our_workers']} worker(s) on our side, load "
        f"{results['loadavg_before'][0]:.2f} before / {results['loadavg_after'][0]:.2f} after"
    )
    work = results["work_per_chain_step"]
    print(
        f"nominal work per chain-step: {work['forward_equivalents']:.2f} minibatch forwards = "
        f"{work['flops'] / 1e9:.2f} GFLOP; matmul peak "
        f"{results['matmul_peak_flop_per_s'] / 1e9:.1f} GFLOP/s"
    )
    print(f"{'side':>10} {'seconds':>9} {'ms/chain-step':>14} {'GFLOP/s':>9} {'of peak':>8}")
    for name, label in (("peer", "devinterp"), ("ours", "bayes_susc")):
        if name in results:
            r = results[name]
            print(
                f"{label:>10} {r['seconds']:9.1f} {r['ms_per_chain_step']:14.1f} "
                f"{r['achieved_flop_per_s'] / 1e9:9.2f} {r['fraction_of_matmul_peak']:8.1%}"
            )
    if "speedup" in results:
        a = results["agreement"]
        print(f"speedup (devinterp s / bayes_susc s): {results['speedup']:.2f}x")
        print(
            f"agreement over {a['entries']} entries: pearson r {a['pearson_r']:.3f} "
            f"(per head median {a['pearson_r_per_head_median']:.3f}); within combined 95% "
            f"MC interval {a['fraction_within_combined_95']:.1%} "
            f"(SEs only: {a['fraction_within_se_only_95']:.1%}); peer output reproduced "
            f"from its draws to {a['peer_output_reproduced_max_abs_err']:.1e}"
        )


def _worker_setup() -> None:
    """A worker's start: the imports this process did before timing. (Workers take this
    process's allocator setting themselves, see ProcessExecutor.)"""
    import transformer_lens  # noqa: F401  (the model's module: unpickling it imports it)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 heads + full, 20 draws, 150 training steps (< 2 min)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_vs_devinterp"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads spin "
        "and swing 5-15x; use 2 on a quiet one)",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc malloc's defaults (by default both sides run after "
        "bayes_susc.sampling.allocator.keep_freed_memory(): the process setting the CLI uses)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="our side's worker processes (ProcessExecutor), each with threads // workers "
        "torch threads; the peer runs in this process with --threads (default 1: in-process)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where both sides sample: cpu (default), cuda, cuda:1, ...",
    )
    parser.add_argument("--skip-peer", action="store_true", help="time bayes_susc only")
    parser.add_argument("--peer-first", action="store_true", help="run devinterp first")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error(f"--workers and --threads must be >= 1, got {args.workers}, {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    torch.set_num_threads(args.threads)
    # Process-wide, so it holds for both sides alike.
    allocator = "glibc default" if args.default_allocator else "keep_freed_memory"
    if not args.default_allocator and not keep_freed_memory():
        allocator = "default (keep_freed_memory unavailable here)"
    cfg = QUICK if args.quick else FULL
    if not args.skip_peer:
        try:
            import devinterp  # noqa: F401
        except ImportError:
            sys.exit(
                "devinterp is not installed: pip install -c constraints.txt -e '.[bench]' "
                "(or pass --skip-peer)"
            )
    results = run_benchmark(
        cfg,
        args.out,
        skip_peer=args.skip_peer,
        peer_first=args.peer_first,
        verbose=True,
        workers=args.workers,
        worker_init=_worker_setup,
        device=args.device,
    )
    results["quick"] = args.quick
    results["allocator"] = allocator
    _print(results)
    print(f"allocator (both sides): {allocator}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
