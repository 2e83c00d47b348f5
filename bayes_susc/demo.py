"""A small end-to-end run: train a byte-level attention-only transformer on standard-library
code and pydoc prose, sample every head's local posterior, and save one InferenceData
per head into a run folder. Finished heads are not recomputed when the run is resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bayes_susc.posterior import LocalPosterior
from bayes_susc.sampling import sample
from bayes_susc.storage import atomic_write, get_group, load, save
from bayes_susc.susceptibility import susceptibility


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (``quick`` shrinks them for tests)."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int = 16
    seq_len: int = 64
    train_steps: int = 400
    n_train: int = 256
    batch_size: int = 16
    n_eval: int = 16
    n_probe: int = 8
    num_chains: int = 4
    num_draws: int = 100
    num_burnin: int = 50
    step_size: float = 1e-3
    nbeta: float = 30.0
    gamma: float = 300.0
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(n_heads=2, train_steps=60, n_train=64, n_probe=4, num_draws=20, num_burnin=10)


def run_demo(out: Path, settings: DemoSettings | None = None, progress: bool | None = None) -> dict:
    """Run (or resume) the demo into ``out``; returns a summary dict (also in ``summary.json``)."""
    from bayes_susc.models.attn_only import (
        AttnOnlyConfig,
        AttnOnlyTransformer,
        head_components,
        next_token_loss,
    )
    from bayes_susc.models.corpus import decode, mixed_corpus
    from bayes_susc.models.train import train

    s = settings or DemoSettings()
    out = Path(out)
    (out / "components").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    cfg = AttnOnlyConfig(
        n_layers=s.n_layers, n_heads=s.n_heads, d_model=s.d_model, d_head=s.d_head, n_ctx=s.seq_len
    )
    model = AttnOnlyTransformer(cfg, generator=s.seed)
    checkpoint = out / "model.pt"
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    else:
        tokens, _ = mixed_corpus(s.n_train, s.seq_len, seed=s.seed)
        train(model, tokens, steps=s.train_steps, batch_size=s.batch_size, lr=3e-3, seed=s.seed)
        atomic_write(checkpoint, lambda tmp: torch.save(model.state_dict(), tmp))
    train_tokens, _ = mixed_corpus(s.n_train, s.seq_len, seed=s.seed)
    train_batches = list(train_tokens.split(s.batch_size))
    eval_tokens, _ = mixed_corpus(s.n_eval, s.seq_len, seed=s.seed + 1)
    probe_tokens, probe_kinds = mixed_corpus(s.n_probe, s.seq_len, seed=s.seed + 2)
    positions = np.arange(1, s.seq_len)
    coords = {
        "dataset": np.repeat(probe_kinds, s.seq_len - 1),
        "sequence": np.repeat(np.arange(s.n_probe), s.seq_len - 1),
        "position": np.tile(positions, s.n_probe),
        "token": [decode([int(t)]) for row in probe_tokens for t in row[1:]],
    }
    summary = {"settings": asdict(s), "components": {}}
    for component in head_components(model):
        path = out / "components" / f"{component.name}.nc"
        if path.exists():
            data = load(path)
        else:
            posterior = LocalPosterior(
                model, next_token_loss, train_batches, component, nbeta=s.nbeta, gamma=s.gamma
            )
            data = sample(
                posterior,
                "sgld",
                step_size=s.step_size,
                eval_data=eval_tokens,
                probe_data=probe_tokens,
                probe_coords=coords,
                num_chains=s.num_chains,
                num_draws=s.num_draws,
                num_burnin=s.num_burnin,
                seed=s.seed,
                progress=progress,
            )
            save(data, path)
        summary["components"][component.name] = _component_summary(data)
    atomic_write(
        out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    return summary


def _component_summary(data) -> dict:
    import arviz as az

    post = get_group(data, "posterior")
    stats = get_group(data, "sample_stats")
    chi = susceptibility(data)
    order = np.argsort(chi.values)
    tokens = post["token"].values if "token" in post.coords else post["probe"].values
    return {
        "mean_phi": float(np.nanmean(post["phi"].values)),
        "rhat_phi": float(az.rhat(post["phi"].values)),
        "ess_phi": float(az.ess(post["phi"].values)),
        "diverged_chains": int(stats["diverged"].any("draw").sum()),
        "most_expressed": [repr(str(tokens[i])) for i in order[:5]],
        "chi_min": float(chi.values.min()),
        "chi_max": float(chi.values.max()),
    }
