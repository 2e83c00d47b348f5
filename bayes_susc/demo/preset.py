"""A small end-to-end run: take the shipped byte-level attention-only transformer (2 layers x
8 heads, trained on standard-library code and pydoc prose, with induction heads: see
:mod:`bayes_susc.demo.train_demo`), sample every head's local posterior, save one
InferenceData per head, then the response matrix (χ with intervals and statuses) and its
figures.

Run folder layout: ``model.safetensors`` (a copy of the shipped checkpoint; nothing is
trained at run time), ``head_roles.nc`` (attention-pattern role scores of every head,
:mod:`bayes_susc.checks.head_roles`), ``components/<head>.nc`` (draws), ``response_matrix.nc``,
``summary.json``, ``report.html`` with its ``figures/*.png`` (:mod:`bayes_susc.report.html`).
Finished heads are not recomputed when the run is resumed; every file is written
atomically, so a killed run leaves no partial files.
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bayes_susc.demo.train_demo import ROLE_VOCAB as _ROLE_VOCAB
from bayes_susc.demo.train_demo import demo_role_scores
from bayes_susc.errors import RunFolderError
from bayes_susc.pipeline.run import check_output_folder, run
from bayes_susc.pipeline.spec import (
    AnalysisSettings,
    EstimationSettings,
    ExecutionSettings,
    RunSpec,
    SamplingSettings,
    UntilConverged,
)
from bayes_susc.storage.draws import atomic_write
from bayes_susc.validation import check_int

#: The shipped demo checkpoint (safetensors) and its config + training record (JSON).
DEMO_CHECKPOINT = Path(__file__).parent / "demo_model.safetensors"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (``quick`` shrinks them for tests).

    The architecture fields must match the shipped checkpoint (2 layers x 8 heads,
    d_model 64, d_head 16, 64-byte context). ``n_train`` windows split into minibatches
    of ``batch_size`` feed the SGLD gradients; ``n_eval`` windows are the evaluation set
    E of φ; ``n_probe`` windows give ``n_probe * (seq_len - 1)`` probe tokens (code and
    prose mixed). ``heads`` names the heads to sample (``None``: all 16).

    ``kernel`` with ``step_size`` and ``kernel_options`` (other hyperparameters, as
    (name, value) pairs) samples each head. The default, SGNHT at ε = 0.03 with
    diffusion 30, is the setting the study ``python -m diagnostics.kernels_heads`` names
    on the demo's heads: 1.7x SGLD's effective draws of χ per CPU second, with less bias
    of ⟨φ⟩ than SGLD at ε = 1e-3 and the same bias of Var φ. :meth:`published` keeps the
    papers' SGLD.

    With ``until`` (the default) the run samples ``num_draws`` draws per chain, then
    extends the heads in rounds of ``round_draws`` until ``fraction`` of the response
    matrix's entries pass its R-hat, ESS and pooled-draws checks, no head would pass
    ``max_draws``, or the next round would end after ``time_budget`` seconds
    (:class:`bayes_susc.pipeline.spec.UntilConverged`); without it, exactly
    ``num_draws``.
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
    steps_per_draw: int = 1
    kernel: str = "sgnht"
    step_size: float = 0.03
    kernel_options: tuple[tuple[str, float], ...] = (("diffusion", 30.0),)
    nbeta: float = 30.0
    gamma: float = 300.0
    seed: int = 0
    heads: tuple[str, ...] | None = None
    until: bool = True
    fraction: float = 0.99
    round_draws: int = 100
    max_draws: int = 2000
    time_budget: float | None = 480.0

    def __post_init__(self) -> None:
        # A summary.json round trip turns the tuple into a list; keep it a (hashable) tuple.
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(str(h) for h in self.heads))
        object.__setattr__(
            self, "kernel_options", tuple((str(k), float(v)) for k, v in self.kernel_options)
        )

    @classmethod
    def published(cls) -> DemoSettings:
        """The setting of the published susceptibility papers, for comparison with them:
        SGLD at ε = 1e-3, nβ 30, γ 300, 4 chains x 200 draws after 100 burn-in steps,
        a fixed length (no convergence target)."""
        return cls(kernel="sgld", step_size=1e-3, kernel_options=(), until=False)

    @classmethod
    def quick(cls) -> DemoSettings:
        """Tiny sampling sizes for tests: the 4 heads of :data:`QUICK_HEADS`, 64 training
        windows, 4 probe sequences (252 tokens), 4 chains x (10 burn-in + 20) draws, a
        fixed length."""
        return cls(
            n_train=64, n_probe=4, num_draws=20, num_burnin=10, heads=QUICK_HEADS, until=False
        )


#: Heads the quick settings sample: the first two of layer 0 and two of layer 1.
QUICK_HEADS = ("L0H0", "L0H1", "L1H0", "L1H1")

#: Tokens of the random blocks used for the induction / duplicate-token scores: the
#: printable ASCII bytes, which the byte-level demo model has seen in training.
ROLE_VOCAB = _ROLE_VOCAB


def demo_data(s: DemoSettings) -> dict:
    """The demo's data: ``train_batches`` (list of (batch_size, seq_len) LongTensors),
    ``eval_tokens`` (n_eval, seq_len), ``probe_tokens`` (n_probe, seq_len) and
    ``probe_kinds`` ('code' / 'prose' per probe window)."""
    from bayes_susc.demo.corpus import mixed_corpus

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
    from bayes_susc.demo.model import AttnOnlyConfig, AttnOnlyTransformer

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
    """Inputs of :func:`bayes_susc.checks.calibration.calibrate` for the demo model (the factory
    of ``examples/calibrate_demo.toml``): the run folder's model (the shipped checkpoint
    is copied there first if the folder has none), its training batches and evaluation
    set, ``n_probe`` probe sequences, and the named heads."""
    from bayes_susc.demo.corpus import mixed_corpus
    from bayes_susc.demo.model import head_components, next_token_loss

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
        legacy = Path(out) / "model.pt"
        try:
            state = torch.load(legacy, weights_only=True)
        except pickle.UnpicklingError:
            # torch's message suggests weights_only=False, i.e. running the file's code.
            raise RunFolderError(
                f"{legacy} holds pickled Python objects, not just tensors; it is refused, "
                "because loading it could run arbitrary code. Delete it (the demo copies "
                "its shipped checkpoint into the folder) or replace it by a state dict"
            ) from None
    model.load_state_dict(state)
    return model.eval()


def demo_head_roles(model, s: DemoSettings):
    """Head-role scores of the demo model: position scores on the ``n_eval`` evaluation
    windows, induction and duplicate-token scores on 32 printable-ASCII blocks of
    ``seq_len // 2`` bytes repeated twice (:func:`bayes_susc.demo.train_demo.demo_role_scores`,
    the scores the training script prints and the checkpoint's JSON records)."""
    return demo_role_scores(model, n_eval=s.n_eval, seed=s.seed)


def demo_spec(
    out: Path, settings: DemoSettings | None = None, workers: int = 1, threads_per_worker: int = 1
) -> RunSpec:
    """The demo as a run spec: the run folder's copy of the shipped model (copied there
    first if missing), every head (or ``settings.heads``), the demo's kernel and settings,
    the default estimation, and the heads' attention-pattern roles."""
    from bayes_susc.demo.corpus import decode
    from bayes_susc.demo.model import head_components, next_token_loss

    s = settings or DemoSettings()
    workers = check_int("workers", workers, minimum=1)
    threads_per_worker = check_int("threads_per_worker", threads_per_worker, minimum=1)
    model = trained_demo_model(out, s)
    data = demo_data(s)
    probe_tokens, probe_kinds = data["probe_tokens"], data["probe_kinds"]
    n_windows = probe_tokens.shape[0]
    coords = {
        "dataset": np.repeat(probe_kinds, s.seq_len - 1),
        "sequence": np.repeat(np.arange(n_windows), s.seq_len - 1),
        "position": np.tile(np.arange(1, s.seq_len), n_windows),
        "token": [decode([int(t)]) for row in probe_tokens for t in row[1:]],
    }
    components = head_components(model)
    if s.heads is not None:
        by_name = {c.name: c for c in components}
        unknown = sorted(set(s.heads) - set(by_name))
        if unknown:
            raise ValueError(f"heads {unknown} are not demo heads; choose from {sorted(by_name)}")
        components = [c for c in components if c.name in s.heads]  # keep the model's order
    execution = (
        ExecutionSettings("processes", workers=workers, threads_per_worker=threads_per_worker)
        if workers > 1
        else ExecutionSettings()
    )
    return RunSpec(
        name="demo",
        model=model,
        model_description=(
            f"the shipped demo AttnOnlyTransformer ({s.n_layers} layers x {s.n_heads} heads, "
            f"d_model {s.d_model}, {s.seq_len}-byte context)"
        ),
        loss_fn=next_token_loss,
        train_data=data["train_batches"],
        eval_data=data["eval_tokens"],
        probe_data=probe_tokens,
        probe_coords=coords,
        components=tuple(components),
        sampling=SamplingSettings(
            kernel=s.kernel,
            hyperparameters={"step_size": s.step_size, **dict(s.kernel_options)},
            nbeta=s.nbeta,
            gamma=s.gamma,
            num_chains=s.num_chains,
            num_draws=s.num_draws,
            num_burnin=s.num_burnin,
            steps_per_draw=s.steps_per_draw,
            seed=s.seed,
            until=(
                UntilConverged(
                    fraction=s.fraction,
                    round_draws=s.round_draws,
                    max_draws=s.max_draws,
                    time_budget=s.time_budget,
                )
                if s.until
                else None
            ),
        ),
        estimation=EstimationSettings(seed=s.seed),
        execution=execution,
        analyses=AnalysisSettings(
            head_roles=functools.partial(demo_head_roles, s=s),
            probe_windows=tuple(tuple(decode([int(t)]) for t in row) for row in probe_tokens),
        ),
        description=asdict(s),
        settings_rows=asdict(s),
    )


def run_demo(
    out: Path,
    settings: DemoSettings | None = None,
    progress: bool | None = None,
    report: bool = True,
    workers: int = 1,
    threads_per_worker: int = 1,
    *,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the demo into ``out``; returns a summary dict (also in ``summary.json``).

    The demo is a preset spec (:func:`demo_spec`) run by the one pipeline,
    :func:`bayes_susc.pipeline.run.run`; ``restart`` and ``log`` are passed to it. With
    ``report`` (default) the run ends by writing ``out/report.html``; its path is
    ``summary["report"]``. ``workers`` > 1 samples the heads side by side on that many
    worker processes with ``threads_per_worker`` torch threads each
    (:class:`bayes_susc.sampling.executor.ProcessExecutor`; same numbers as in this
    process); progress is then one bar over the heads.
    """
    out = check_output_folder(Path(out))
    spec = demo_spec(out, settings, workers, threads_per_worker)
    return run(spec, out, progress=progress, restart=restart, report=report, log=log)
