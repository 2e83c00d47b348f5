"""A small end-to-end run: take the shipped byte-level attention-only transformer (2 layers x
8 heads, trained on standard-library code and pydoc prose, with induction heads: see
:mod:`bayes_susc.models.train_demo`), sample every head's local posterior, save one
InferenceData per head, then the response matrix (χ with intervals and statuses) and its
figures.

Run folder layout: ``model.safetensors`` (a copy of the shipped checkpoint; nothing is
trained at run time), ``head_roles.nc`` (attention-pattern role scores of every head,
:mod:`bayes_susc.head_roles`), ``components/<head>.nc`` (draws), ``response_matrix.nc``,
``summary.json``, ``report.html`` with its ``figures/*.png`` (:mod:`bayes_susc.report`).
Finished heads are not recomputed when the run is resumed; every file is written
atomically, so a killed run leaves no partial files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_susc.models.train_demo import ROLE_VOCAB as _ROLE_VOCAB
from bayes_susc.models.train_demo import demo_role_scores
from bayes_susc.storage import atomic_write, get_group, load, save
from bayes_susc.susceptibility import susceptibility
from bayes_susc.validation import check_int

#: The shipped demo checkpoint (safetensors) and its config + training record (JSON).
DEMO_CHECKPOINT = Path(__file__).parent / "models" / "demo_model.safetensors"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (``quick`` shrinks them for tests).

    The architecture fields must match the shipped checkpoint (2 layers x 8 heads,
    d_model 64, d_head 16, 64-byte context). ``n_train`` windows split into minibatches
    of ``batch_size`` feed the SGLD gradients; ``n_eval`` windows are the evaluation set
    E of φ; ``n_probe`` windows give ``n_probe * (seq_len - 1)`` probe tokens (code and
    prose mixed). ``heads`` names the heads to sample (``None``: all 16).
    """

    n_layers: int = 2
    n_heads: int = 8
    d_model: int = 64
    d_head: int = 16
    seq_len: int = 64
    n_train: int = 256
    batch_size: int = 16
    n_eval: int = 16
    n_probe: int = 64  # 64 x 63 = 4,032 probe tokens
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 100
    step_size: float = 1e-3
    nbeta: float = 30.0
    gamma: float = 300.0
    seed: int = 0
    heads: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # A summary.json round trip turns the tuple into a list; keep it a (hashable) tuple.
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(str(h) for h in self.heads))

    @classmethod
    def quick(cls) -> DemoSettings:
        """Tiny sampling sizes for tests: the 4 heads of :data:`QUICK_HEADS`, 64 training
        windows, 4 probe sequences (252 tokens), 4 chains x (10 burn-in + 20) draws."""
        return cls(n_train=64, n_probe=4, num_draws=20, num_burnin=10, heads=QUICK_HEADS)


#: Heads the quick settings sample: the first two of layer 0 and two of layer 1.
QUICK_HEADS = ("L0H0", "L0H1", "L1H0", "L1H1")

#: Tokens of the random blocks used for the induction / duplicate-token scores: the
#: printable ASCII bytes, which the byte-level demo model has seen in training.
ROLE_VOCAB = _ROLE_VOCAB


def demo_data(s: DemoSettings) -> dict:
    """The demo's data: ``train_batches`` (list of (batch_size, seq_len) LongTensors),
    ``eval_tokens`` (n_eval, seq_len), ``probe_tokens`` (n_probe, seq_len) and
    ``probe_kinds`` ('code' / 'prose' per probe window)."""
    from bayes_susc.models.corpus import mixed_corpus

    train_tokens, _ = mixed_corpus(s.n_train, s.seq_len, seed=s.seed)
    eval_tokens, _ = mixed_corpus(s.n_eval, s.seq_len, seed=s.seed + 1)
    probe_tokens, probe_kinds = mixed_corpus(s.n_probe, s.seq_len, seed=s.seed + 2)
    return {
        "train_batches": list(train_tokens.split(s.batch_size)),
        "eval_tokens": eval_tokens,
        "probe_tokens": probe_tokens,
        "probe_kinds": probe_kinds,
    }


def _demo_model(s: DemoSettings):
    from bayes_susc.models.attn_only import AttnOnlyConfig, AttnOnlyTransformer

    cfg = AttnOnlyConfig(
        n_layers=s.n_layers, n_heads=s.n_heads, d_model=s.d_model, d_head=s.d_head, n_ctx=s.seq_len
    )
    return AttnOnlyTransformer(cfg, generator=s.seed)


def _check_shipped_config(s: DemoSettings) -> None:
    """Raise ValueError when ``s`` describes another architecture than the shipped model."""
    cfg = json.loads(DEMO_CHECKPOINT.with_suffix(".json").read_text())["config"]
    want = {k: cfg[k] for k in ("n_layers", "n_heads", "d_model", "d_head")}
    want["seq_len"] = cfg["n_ctx"]
    got = {k: getattr(s, k) for k in want}
    if got != want:
        raise ValueError(f"the shipped demo model has {want}; the settings ask for {got}")


def trained_demo_model(out: Path, s: DemoSettings):
    """The run folder's demo model in eval mode.

    Loaded from ``out/model.safetensors`` (or a legacy ``out/model.pt`` state dict, read
    with ``weights_only=True``); when the folder has neither, the shipped checkpoint
    (:data:`DEMO_CHECKPOINT`) is copied there first (atomically). Nothing is trained.
    """
    import shutil

    out = Path(out)
    if not (out / "model.safetensors").exists() and not (out / "model.pt").exists():
        _check_shipped_config(s)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "model.safetensors", lambda tmp: shutil.copyfile(DEMO_CHECKPOINT, tmp))
    return load_demo_model(out, s)


def calibration_inputs(
    run_dir: str = "runs/demo", heads: tuple[str, ...] = ("L0H0", "L1H0"), n_probe: int = 2
) -> dict:
    """Inputs of :func:`bayes_susc.calibration.calibrate` for the demo model (the factory
    of ``examples/calibrate_demo.toml``): the run folder's model (the shipped checkpoint
    is copied there first if the folder has none), its training batches and evaluation
    set, ``n_probe`` probe sequences, and the named heads."""
    from bayes_susc.models.attn_only import head_components, next_token_loss
    from bayes_susc.models.corpus import mixed_corpus

    s = DemoSettings()
    data = demo_data(s)
    model = trained_demo_model(Path(run_dir), s)
    by_name = {c.name: c for c in head_components(model)}
    unknown = sorted(set(heads) - set(by_name))
    if unknown:
        raise ValueError(f"heads {unknown} are not demo heads; choose from {sorted(by_name)}")
    probe_tokens, _ = mixed_corpus(n_probe, s.seq_len, seed=s.seed + 2)
    return {
        "model": model,
        "loss_fn": next_token_loss,
        "train_data": data["train_batches"],
        "eval_data": data["eval_tokens"],
        "probe_data": probe_tokens,
        "components": [by_name[h] for h in heads],
    }


def load_demo_model(out: Path, settings: DemoSettings):
    """The demo model of run folder ``out``, in eval mode: from ``out/model.safetensors``
    (no pickle), else from a legacy ``out/model.pt`` state dict (``weights_only=True``)."""
    model = _demo_model(settings)
    path = Path(out) / "model.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(Path(out) / "model.pt", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def demo_head_roles(model, s: DemoSettings):
    """Head-role scores of the demo model: position scores on the ``n_eval`` evaluation
    windows, induction and duplicate-token scores on 32 printable-ASCII blocks of
    ``seq_len // 2`` bytes repeated twice (:func:`bayes_susc.models.train_demo.demo_role_scores`,
    the scores the training script prints and the checkpoint's JSON records)."""
    return demo_role_scores(model, n_eval=s.n_eval, seed=s.seed)


def run_demo(
    out: Path,
    settings: DemoSettings | None = None,
    progress: bool | None = None,
    report: bool = True,
    workers: int = 1,
    threads_per_worker: int = 1,
) -> dict:
    """Run (or resume) the demo into ``out``; returns a summary dict (also in ``summary.json``).

    With ``report`` (default) the run ends by writing ``out/report.html``
    (:func:`bayes_susc.report.write_report`); its path is ``summary["report"]``.
    ``workers`` > 1 samples the heads side by side on that many worker processes with
    ``threads_per_worker`` torch threads each (:class:`bayes_susc.executor.ProcessExecutor`;
    same numbers as in this process); progress is then one bar over the heads.
    """
    import xarray as xr

    from bayes_susc.models.attn_only import head_components, next_token_loss
    from bayes_susc.models.corpus import decode

    s = settings or DemoSettings()
    workers = check_int("workers", workers, minimum=1)
    threads_per_worker = check_int("threads_per_worker", threads_per_worker, minimum=1)
    out = Path(out)
    (out / "components").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    model = trained_demo_model(out, s)
    roles_path = out / "head_roles.nc"
    if roles_path.exists():
        with xr.open_dataset(roles_path, engine="netcdf4") as f:
            roles = f.load()
    else:
        roles = demo_head_roles(model, s)
        atomic_write(roles_path, lambda tmp: roles.to_netcdf(tmp, engine="netcdf4"))
    data = demo_data(s)
    train_batches, eval_tokens = data["train_batches"], data["eval_tokens"]
    probe_tokens, probe_kinds = data["probe_tokens"], data["probe_kinds"]
    n_windows = probe_tokens.shape[0]
    positions = np.arange(1, s.seq_len)
    coords = {
        "dataset": np.repeat(probe_kinds, s.seq_len - 1),
        "sequence": np.repeat(np.arange(n_windows), s.seq_len - 1),
        "position": np.tile(positions, n_windows),
        "token": [decode([int(t)]) for row in probe_tokens for t in row[1:]],
    }
    summary = {"settings": asdict(s), "components": {}}
    summary["head_roles"] = {
        str(c): {name: round(float(roles[name].sel(component=c)), 4) for name in roles.data_vars}
        for c in roles["component"].values
    }
    components = head_components(model)
    if s.heads is not None:
        by_name = {c.name: c for c in components}
        unknown = sorted(set(s.heads) - set(by_name))
        if unknown:
            raise ValueError(f"heads {unknown} are not demo heads; choose from {sorted(by_name)}")
        components = [c for c in components if c.name in s.heads]  # keep the model's order

    def path_of(name: str) -> Path:
        return out / "components" / f"{name}.nc"

    runs = {c.name: load(path_of(c.name)) for c in components if path_of(c.name).exists()}
    todo = [c for c in components if c.name not in runs]
    if todo:
        from tqdm.auto import tqdm

        from bayes_susc.executor import LocalExecutor, Problem, ProcessExecutor, iter_components

        problem = Problem(model, next_token_loss, train_batches, eval_tokens, probe_tokens, coords)
        executor = (
            ProcessExecutor(workers, threads_per_worker=threads_per_worker)
            if workers > 1
            else LocalExecutor()
        )
        # In this process each head shows its chains' bars; on workers, one bar over heads
        # (progress None: only on a terminal).
        hide_heads_bar = True if workers == 1 else None if progress is None else not progress
        with executor:
            results = iter_components(
                problem,
                todo,
                executor=executor,
                nbeta=s.nbeta,
                gamma=s.gamma,
                kernel="sgld",
                step_size=s.step_size,
                num_chains=s.num_chains,
                num_draws=s.num_draws,
                num_burnin=s.num_burnin,
                seed=s.seed,
                progress=progress if workers == 1 else False,
            )
            bar = tqdm(results, total=len(todo), desc="heads", unit="head", disable=hide_heads_bar)
            for name, data in bar:
                save(data, path_of(name))  # each head as it comes: a killed run resumes
                runs[name] = data
    runs = {c.name: runs[c.name] for c in components}  # the model's order
    for name, data in runs.items():
        summary["components"][name] = component_summary(data)
    summary["response_matrix"] = _response_matrix(runs, out, s.seed)
    summary["report"] = str(out / "report.html") if report else None
    atomic_write(
        out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    if report:
        from bayes_susc.report import write_report

        write_report(out)
    return summary


def remove_stale_temporaries(out: Path) -> None:
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


def component_summary(data: Any) -> dict:
    """Headline figures of one component's run (an InferenceData/DataTree from
    :func:`bayes_susc.sample` with probe losses): mean φ (nats), R-hat and ESS of φ, the
    number of diverged chains, the five most expressed probe tokens (most negative χ),
    and the smallest and largest χ."""
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
