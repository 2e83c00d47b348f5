"""A small end-to-end run: train a byte-level attention-only transformer on standard-library
code and pydoc prose, sample every head's local posterior, save one InferenceData per
head, then the response matrix (χ with intervals and statuses) and its figures.

Run folder layout: ``model.pt`` (state dict), ``head_roles.nc`` (attention-pattern role
scores of every head, :mod:`bayes_susc.head_roles`), ``components/<head>.nc`` (draws),
``response_matrix.nc``, ``summary.json``, ``report.html`` with its ``figures/*.png``
(:mod:`bayes_susc.report`). Finished heads are not recomputed when the run is resumed;
every file is written atomically, so a killed run leaves no partial files.
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
    num_draws: int = 200
    num_burnin: int = 100
    step_size: float = 1e-3
    nbeta: float = 30.0
    gamma: float = 300.0
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(n_heads=2, train_steps=60, n_train=64, n_probe=4, num_draws=20, num_burnin=10)


#: Tokens of the random blocks used for the induction / duplicate-token scores: the
#: printable ASCII bytes, which the byte-level demo model has seen in training.
ROLE_VOCAB = tuple(range(32, 127))


def _demo_model(s: DemoSettings):
    from bayes_susc.models.attn_only import AttnOnlyConfig, AttnOnlyTransformer

    cfg = AttnOnlyConfig(
        n_layers=s.n_layers, n_heads=s.n_heads, d_model=s.d_model, d_head=s.d_head, n_ctx=s.seq_len
    )
    return AttnOnlyTransformer(cfg, generator=s.seed)


def trained_demo_model(out: Path, s: DemoSettings):
    """The run folder's demo model in eval mode: loaded from ``out/model.pt`` (with
    ``weights_only=True``), or trained from ``s`` and saved there atomically first."""
    from bayes_susc.models.corpus import mixed_corpus
    from bayes_susc.models.train import train

    out = Path(out)
    checkpoint = out / "model.pt"
    if checkpoint.exists():
        return load_demo_model(out, s)
    torch.manual_seed(s.seed)
    model = _demo_model(s)
    tokens, _ = mixed_corpus(s.n_train, s.seq_len, seed=s.seed)
    train(model, tokens, steps=s.train_steps, batch_size=s.batch_size, lr=3e-3, seed=s.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(checkpoint, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


def calibration_inputs(
    run_dir: str = "runs/demo", heads: tuple[str, ...] = ("L0H0", "L1H0"), n_probe: int = 2
) -> dict:
    """Inputs of :func:`bayes_susc.calibration.calibrate` for the demo model (the factory
    of ``examples/calibrate_demo.toml``): the run folder's model (trained first if the
    folder has none), its training batches and evaluation set, ``n_probe`` probe
    sequences, and the named heads."""
    from bayes_susc.models.attn_only import head_components, next_token_loss
    from bayes_susc.models.corpus import mixed_corpus

    s = DemoSettings()
    model = trained_demo_model(Path(run_dir), s)
    by_name = {c.name: c for c in head_components(model)}
    unknown = sorted(set(heads) - set(by_name))
    if unknown:
        raise ValueError(f"heads {unknown} are not demo heads; choose from {sorted(by_name)}")
    train_tokens, _ = mixed_corpus(s.n_train, s.seq_len, seed=s.seed)
    eval_tokens, _ = mixed_corpus(s.n_eval, s.seq_len, seed=s.seed + 1)
    probe_tokens, _ = mixed_corpus(n_probe, s.seq_len, seed=s.seed + 2)
    return {
        "model": model,
        "loss_fn": next_token_loss,
        "train_data": list(train_tokens.split(s.batch_size)),
        "eval_data": eval_tokens,
        "probe_data": probe_tokens,
        "components": [by_name[h] for h in heads],
    }


def load_demo_model(out: Path, settings: DemoSettings):
    """The trained demo model of run folder ``out`` (from ``out/model.pt``), in eval mode."""
    model = _demo_model(settings)
    model.load_state_dict(torch.load(Path(out) / "model.pt", weights_only=True))
    return model.eval()


def demo_head_roles(model, s: DemoSettings):
    """Head-role scores of the demo model: position scores on evaluation text, induction
    and duplicate-token scores on 32 printable-ASCII blocks of ``seq_len // 2`` bytes
    repeated twice."""
    from bayes_susc.head_roles import head_role_scores
    from bayes_susc.models.corpus import mixed_corpus

    eval_tokens, _ = mixed_corpus(s.n_eval, s.seq_len, seed=s.seed + 1)
    return head_role_scores(model, eval_tokens, n_repeats=32, vocab=ROLE_VOCAB, seed=s.seed)


def run_demo(
    out: Path,
    settings: DemoSettings | None = None,
    progress: bool | None = None,
    report: bool = True,
) -> dict:
    """Run (or resume) the demo into ``out``; returns a summary dict (also in ``summary.json``).

    With ``report`` (default) the run ends by writing ``out/report.html``
    (:func:`bayes_susc.report.write_report`); its path is ``summary["report"]``.
    """
    import xarray as xr

    from bayes_susc.models.attn_only import head_components, next_token_loss
    from bayes_susc.models.corpus import decode, mixed_corpus

    s = settings or DemoSettings()
    out = Path(out)
    (out / "components").mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    model = trained_demo_model(out, s)
    roles_path = out / "head_roles.nc"
    if roles_path.exists():
        with xr.open_dataset(roles_path, engine="netcdf4") as f:
            roles = f.load()
    else:
        roles = demo_head_roles(model, s)
        atomic_write(roles_path, lambda tmp: roles.to_netcdf(tmp, engine="netcdf4"))
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
    summary["head_roles"] = {
        str(c): {name: round(float(roles[name].sel(component=c)), 4) for name in roles.data_vars}
        for c in roles["component"].values
    }
    runs = {}
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
        runs[component.name] = data
        summary["components"][component.name] = _component_summary(data)
    summary["response_matrix"] = _response_matrix(runs, out, s.seed)
    summary["report"] = str(out / "report.html") if report else None
    atomic_write(
        out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    if report:
        from bayes_susc.report import write_report

        write_report(out)
    return summary


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files a killed run left behind (``atomic_write`` names them
    ``<target name>.<random>.tmp``; a finished write renames or removes its own)."""
    for folder in (out, out / "components", out / "figures"):
        for tmp in folder.glob("*.*.tmp"):
            if tmp.is_file():
                tmp.unlink()


def _response_matrix(runs: dict, out: Path, seed: int) -> dict:
    """Build and save the response matrix; returns its headline figures (the report
    draws the figures)."""
    from bayes_susc.response_matrix import build_response_matrix, pca, save_response_matrix

    matrix = build_response_matrix(runs, seed=seed)
    save_response_matrix(matrix, out / "response_matrix.nc")
    # PCA on every finite entry: at the published 4 x 200 draws most entries miss
    # R-hat <= 1.01, and a fill-in model fitted to the few converged ones would then
    # shape the components. Statuses stay visible on the heat map and in the matrix.
    n_pc = min(3, matrix.sizes["component"])
    weighting = "all finite entries"
    components = pca(matrix, n_components=n_pc, weights=None)
    status = matrix["status"].values.ravel()
    names, counts = np.unique(status, return_counts=True)
    return {
        "shape": [int(n) for n in matrix["chi"].shape],
        "status_counts": {str(k): int(v) for k, v in zip(names, counts)},
        "pca_weights": weighting,
        "explained_variance_ratio": [
            round(float(v), 4) for v in components["explained_variance_ratio"].values
        ],
        "loadings_pc1": {
            str(c): round(float(v), 3)
            for c, v in zip(components["component"].values, components["loadings"].sel(pc=1).values)
        },
    }


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
