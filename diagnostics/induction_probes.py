"""Do the demo's susceptibilities single out its induction heads? A probe-design study.

    python -m diagnostics.induction_probes [--quick] [--out DIR] [--seed S]

The shipped demo model has five layer-1 heads with induction scores 0.39-0.74
(:func:`bayes_susc.demo.train_demo.demo_role_scores`); issue 5 asks that the response
matrix's PCA or clustering separates the top ones from the other heads. This study samples
the heads (the demo's sampler: SGLD, ε = 1e-3, 4 chains × (100 burn-in + 200 draws)) on
probes where induction is the only way to predict: blocks of 32 random printable bytes
repeated twice (the second copy is predictable by induction only), beside natural
code/prose windows, and reports per head

- data-set susceptibilities (:func:`bayes_susc.estimate` with ``groups``, each with its
  interval): χ of the first and of the second copy of the repeated blocks, and of the
  natural windows;
- PCA margins (:func:`bayes_susc.report.html.induction_separation`) of the top 1-4 induction
  heads on the per-token matrix, with and without row centring.

Each setting varies one thing: ``nbeta`` (30 = the demo's default; larger values sharpen the
posterior) and the data the posterior and φ are built on: ``natural`` (the demo's code+prose
windows) or ``training`` (the model's own training distribution, a quarter of each batch a
repeated random block, :func:`bayes_susc.demo.train_demo.training_batch`). An induction
head that *expresses* induction tokens would show χ(second copy) well below χ(first copy).
Further settings sample groups of layer-1 heads jointly (:data:`JOINT_HEADS`), in case the
induction work is shared among them; split :data:`PROBED_HEADS` into their QK circuit
(W_Q, W_K, b_Q, b_K) and OV circuit (W_V, W_O, b_V), to see which part of a head the
posterior moves and which part carries the contrast; and sample those heads whole at
γ = :data:`STRONG_GAMMA`, a ten times stronger localization.

Measured (2026-12-02, ``diagnostics/reports/induction_probes``: 16 heads, 16 natural and 16
repeated windows, then the joint runs; 18 min on one core). In every setting all eight
layer-0 heads express the second copy strongly (contrast −4.7 to −40 ×1e-3, intervals well
away from zero), consistent with their feeding layer 1's induction (previous-token
information for its keys). No layer-1 head does (−0.5 to +0.15 ×1e-3, intervals of about
±0.5 ×1e-3), the strongest induction heads included. The posterior's spread in a layer-1
head (φ ≈ 0.2-0.3 nats at nβ = 30) moves the losses of induction and ordinary tokens alike:
per-token loss standard deviation 0.63 against 0.59 nats for L1H2 (training-mixture
posterior). Redundancy is not the reason: sampling the layer-1 induction heads *jointly* as
one component (two, all five, the whole layer) gives contrasts of +0.03, −0.18 and −1.2
×1e-3, against −4.7 or below for every single layer-0 head. No PCA margin is positive for
the top 2-4 induction heads (best −0.04); at nβ = 300 the top one alone gets +0.31.
Sharpening the posterior tenfold or sampling it on the model's own training mixture does
not change this picture.

Circuits (21 min in all with them, one core): the posterior moves a layer-1 head almost
only through its OV circuit (mean φ 0.21-0.28 nats, against 0.011-0.012 for its QK
circuit), and neither circuit carries the contrast (QK −0.03 to +0.004, OV −0.34 to −0.13
×1e-3, for the top induction heads L1H2 and L1H4 as for L1H3, which does no induction).
The perturbations the posterior admits leave the attention patterns in place and add
noise to what the head writes, which raises the loss of induction and ordinary tokens
alike. In the previous-token head L0H0 the contrast sits in the OV circuit (−9.0 ×1e-3;
QK −0.01): what it writes is what layer 1's induction keys read. At γ = 3000 the layer-1
contrasts stay at −0.02 to +0.02 ×1e-3 (L0H0: −1.35).

OV's parts (rerun 2026-12-02, 24 min on one core beside the test suite; every earlier
setting reproduced exactly): a shift the value bias b_V adds at every position is not what
moves the layer-1 heads. Without b_V their OV weights keep nearly all of φ (0.20-0.28
nats against 0.21-0.28 with it) and the contrast stays at −0.17 to +0.06 ×1e-3 (L1H2
−0.06, L1H4 +0.06, L1H3 −0.17); W_O alone moves φ by 0.03-0.10 nats and gives +0.006 to
+0.10. The posterior moves these heads through W_V, and still alike on induction and
ordinary tokens. L0H0's contrast stays in its OV weights (−8.7 without b_V; W_O alone
+0.11): what it reads through W_V carries it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diagnostics._report import md_table, study_main

NAME = "induction_probes"
FULL_HEADS = None  # all 16
QUICK_HEADS = ("L0H0", "L0H4", "L1H2", "L1H3")
BLOCK = 32  # tokens per random block; windows are two copies (64 = the model's context)


def _data(posterior_data: str, n_natural: int, n_repeat: int, seed: int) -> dict[str, Any]:
    """Training batches, evaluation set and probes (natural windows, then repeated blocks)
    with probe coordinates ``dataset`` and ``position``."""
    from bayes_susc.checks.head_roles import repeated_random_tokens
    from bayes_susc.demo.preset import DemoSettings, demo_data
    from bayes_susc.demo.train_demo import ROLE_VOCAB, TrainRecipe, training_batch

    s = DemoSettings()
    d = demo_data(s)
    if posterior_data == "training":
        recipe = TrainRecipe(batch_size=s.batch_size)
        rng = np.random.default_rng(seed + 100)
        n_batches = len(d["train_batches"])
        d["train_batches"] = [training_batch(rng, recipe, s.seq_len) for _ in range(n_batches)]
        d["eval_tokens"] = training_batch(np.random.default_rng(seed + 101), recipe, s.seq_len)
    natural = d["probe_tokens"][:n_natural]
    # Seeds apart from the head-role scores' blocks (seed 0).
    repeated = repeated_random_tokens(n_repeat, BLOCK, ROLE_VOCAB, seed=seed + 11)
    probe = torch.cat([natural, repeated])
    kinds = list(d["probe_kinds"][:n_natural]) + ["repeat"] * n_repeat
    width = s.seq_len - 1
    coords = {
        "dataset": np.repeat(kinds, width),
        "position": np.tile(np.arange(1, s.seq_len), probe.shape[0]),
    }
    return {
        "settings": s,
        "train": d["train_batches"],
        "eval": d["eval_tokens"],
        "probe": probe,
        "coords": coords,
    }


def _groups(coords: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rep = coords["dataset"] == "repeat"
    return {
        "natural": ~rep,
        "repeat, first copy": rep & (coords["position"] < BLOCK),
        "repeat, second copy": rep & (coords["position"] >= BLOCK),
    }


def _model():
    """The shipped demo model (copied into a throw-away run folder) and its induction
    scores over ``component``."""
    import tempfile

    from bayes_susc.demo.preset import DemoSettings, demo_head_roles, trained_demo_model

    settings = DemoSettings()
    with tempfile.TemporaryDirectory() as tmp:
        model = trained_demo_model(Path(tmp), settings)
    return model, demo_head_roles(model, settings)["induction"]


def _sample_groups(model, data, components, nbeta, step_size, quick, seed) -> tuple[dict, dict]:
    """Sample each component; returns (runs, {name: {group: {chi, ci_low, ci_high}}, and
    ``"mean_phi"``: the posterior mean of φ (nats)})."""
    from bayes_susc import LocalPosterior, sample
    from bayes_susc.demo.model import next_token_loss
    from bayes_susc.estimation.susceptibility import estimate

    groups = _groups(data["coords"])
    runs, chi = {}, {}
    for component in components:
        posterior = LocalPosterior(
            model,
            next_token_loss,
            data["train"],
            component,
            nbeta=nbeta,
            gamma=data["settings"].gamma,
        )
        runs[component.name] = run = sample(
            posterior,
            "sgld",
            step_size=step_size,
            eval_data=data["eval"],
            probe_data=data["probe"],
            probe_coords=data["coords"],
            num_chains=4,
            num_draws=50 if quick else 200,
            num_burnin=20 if quick else 100,
            seed=seed,
            progress=False,
        )
        est = estimate(run, groups=groups, seed=seed)
        chi[component.name] = {
            str(g): {key: float(est[key].sel(probe=g)) for key in ("chi", "ci_low", "ci_high")}
            for g in groups
        }
        chi[component.name]["mean_phi"] = float(np.nanmean(run.posterior["phi"].values))
    return runs, chi


def _setting(
    model,
    induction,
    heads,
    nbeta: float,
    step_size: float,
    posterior_data: str,
    quick: bool,
    seed: int,
) -> dict[str, Any]:
    from bayes_susc.demo.model import head_components
    from bayes_susc.estimation.response_matrix import build_response_matrix, pca
    from bayes_susc.report.html import induction_separation

    data = _data(posterior_data, 4 if quick else 16, 4 if quick else 16, seed)
    components = [c for c in head_components(model) if heads is None or c.name in heads]
    runs, chi = _sample_groups(model, data, components, nbeta, step_size, quick, seed)
    per_head = {
        name: {"induction_score": float(induction.sel(component=name)), **chi[name]}
        for name in runs
    }
    matrix = build_response_matrix(runs, seed=seed)
    margins = {}
    n_heads = len(runs)
    for center in (False, True):
        res = pca(matrix, n_components=min(3, n_heads), weights=None, center_rows=center)
        loadings = res["loadings"].transpose("component", "pc")
        for k in range(1, min(4, n_heads - 1) + 1):
            margin = induction_separation(loadings, induction, k)
            margins[f"top {k}, rows {'centred' if center else 'raw'}"] = float(margin.max())
    return {
        "nbeta": nbeta,
        "step_size": step_size,
        "posterior_data": posterior_data,
        "heads": per_head,
        "best_pca_margin": margins,
    }


#: Layer-1 heads sampled together as one component (the induction work may be shared):
#: the two strongest induction heads, all five with score > 0.35, a non-induction pair, and
#: the whole layer.
JOINT_HEADS = {
    "L1H2+L1H4": ("L1H2", "L1H4"),
    "L1H1+L1H2+L1H4+L1H5+L1H7": ("L1H1", "L1H2", "L1H4", "L1H5", "L1H7"),
    "L1H3+L1H6": ("L1H3", "L1H6"),
    "L1 (all 8)": tuple(f"L1H{h}" for h in range(8)),
}


def joint_component(model, name: str, heads: tuple[str, ...]):
    """One component freeing every entry of the named heads
    (:func:`~bayes_susc.demo.model.head_components`) at once, as boolean masks."""
    from bayes_susc.demo.model import head_components
    from bayes_susc.target.architectures import by_mask

    by_name = {c.name: c for c in head_components(model)}
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for head in heads:
        resolved = by_name[head].resolve(model)
        for pname, index in zip(resolved.param_names, resolved.flat_indices):
            flat = masks.setdefault(pname, torch.zeros(params[pname].numel(), dtype=torch.bool))
            flat[index] = True
    return by_mask(name, {p: m.reshape(params[p].shape) for p, m in masks.items()}, model)


def _joint_setting(model, quick: bool, seed: int) -> dict[str, Any]:
    """The demo's defaults (nβ 30, ε 1e-3, natural data), heads sampled jointly."""
    data = _data("natural", 4 if quick else 16, 4 if quick else 16, seed)
    joint = dict(list(JOINT_HEADS.items())[:1]) if quick else JOINT_HEADS
    components = [joint_component(model, name, heads) for name, heads in joint.items()]
    _, chi = _sample_groups(model, data, components, 30.0, 1e-3, quick, seed)
    return chi


#: Heads split into circuits and resampled at a stronger localization: the two strongest
#: induction heads, a layer-1 head without induction, a layer-0 head.
PROBED_HEADS = ("L1H2", "L1H4", "L1H3", "L0H0")
#: Parts of a head: which of its parameter slices each frees. QK and OV partition the head;
#: OV's weights without b_V, and W_O alone, tell whether what the posterior moves in OV is
#: the value bias (a shift the same at every position) or the maps.
CIRCUITS = {
    "QK": ("W_Q", "W_K", "b_Q", "b_K"),
    "OV": ("W_V", "W_O", "b_V"),
    "OV-weights": ("W_V", "W_O"),
    "W_O": ("W_O",),
}
#: The stronger localization (10x the demo's γ; εγ = 3 stays below SGLD's limit of 4).
STRONG_GAMMA = 3000.0


def circuit_components(model, heads: tuple[str, ...]) -> list:
    """The parts of :data:`CIRCUITS` of each named head as components ``<head>.<part>``
    (e.g. ``<head>.QK``: its slices of W_Q, W_K, b_Q, b_K), in that order: the head's
    component of :func:`~bayes_susc.demo.model.head_components` split by parameter."""
    from bayes_susc import Component
    from bayes_susc.demo.model import head_components

    by_name = {c.name: c for c in head_components(model)}
    out = []
    for name in heads:
        selections = by_name[name].selections
        for circuit, params in CIRCUITS.items():
            part = {p: sel for p, sel in selections.items() if p.rsplit(".", 1)[1] in params}
            out.append(Component(f"{name}.{circuit}", part))
    return out


def _circuit_settings(model, quick: bool, seed: int) -> dict[str, Any]:
    """The demo's defaults with each probed head split into the parts of :data:`CIRCUITS`, and
    the whole probed heads at γ = :data:`STRONG_GAMMA`."""
    import dataclasses

    from bayes_susc.demo.model import head_components

    heads = PROBED_HEADS[:1] if quick else PROBED_HEADS
    data = _data("natural", 4 if quick else 16, 4 if quick else 16, seed)
    _, circuits = _sample_groups(
        model, data, circuit_components(model, heads), 30.0, 1e-3, quick, seed
    )
    data["settings"] = dataclasses.replace(data["settings"], gamma=STRONG_GAMMA)
    whole = [c for c in head_components(model) if c.name in heads]
    _, strong = _sample_groups(model, data, whole, 30.0, 1e-3, quick, seed)
    return {"circuits": circuits, "strong_gamma": strong}


def run_study(quick: bool, seed: int) -> dict[str, Any]:
    """Every setting of the module docstring; quick: 4 heads, fewer probes and draws."""
    torch.set_num_threads(1)
    model, induction = _model()
    heads = QUICK_HEADS if quick else FULL_HEADS
    settings = [(30.0, 1e-3, "natural"), (30.0, 1e-3, "training"), (300.0, 1e-3, "training")]
    if quick:
        settings = settings[:2]
    return {
        "quick": quick,
        "seed": seed,
        "settings": [
            _setting(model, induction, heads, nb, eps, pd, quick, seed) for nb, eps, pd in settings
        ],
        "joint": _joint_setting(model, quick, seed),
        **_circuit_settings(model, quick, seed),
    }


def _contrast(groups: dict[str, Any]) -> float:
    """χ(second copy) − χ(first copy) of one component's data-set estimates."""
    return groups["repeat, second copy"]["chi"] - groups["repeat, first copy"]["chi"]


def plots(results: dict[str, Any], out: Path) -> None:
    """χ(second copy) − χ(first copy) per head against its induction score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in results["settings"]:
        heads = s["heads"]
        x = [h["induction_score"] for h in heads.values()]
        y = [_contrast(h) for h in heads.values()]
        ax.scatter(x, y, label=f"nβ {s['nbeta']:g}, {s['posterior_data']} data", s=18)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("induction score (attention)")
    ax.set_ylabel("χ(second copy) − χ(first copy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "induction_contrast.png", dpi=120)
    plt.close(fig)


def _contrast_summary(heads: dict[str, Any]) -> str:
    """One sentence: the range of χ(second copy) − χ(first copy) per layer, ×1e3."""
    parts = []
    for layer in sorted({name[:2] for name in heads}):
        d = [1e3 * _contrast(h) for name, h in heads.items() if name.startswith(layer)]
        parts.append(f"layer {layer[1:]} heads {min(d):+.2f} to {max(d):+.2f}")
    return "χ(second copy) − χ(first copy) ×1e3: " + "; ".join(parts) + "."


def _group_table(runs: dict[str, Any], label: str) -> str:
    """Data-set χ per component (×1e3), with its induction score and the posterior mean
    of φ where the results hold them."""
    first = next(iter(runs.values()))
    scored = "induction_score" in first
    rows = []
    for name, g in runs.items():
        second = g["repeat, second copy"]
        rows.append(
            [name]
            + ([g["induction_score"]] if scored else [])
            + [
                g.get("mean_phi", float("nan")),
                1e3 * g["natural"]["chi"],
                1e3 * g["repeat, first copy"]["chi"],
                1e3 * second["chi"],
                f"[{1e3 * second['ci_low']:.2f}, {1e3 * second['ci_high']:.2f}]",
                1e3 * _contrast(g),
            ]
        )
    header = (
        [label]
        + (["induction score"] if scored else [])
        + [
            "mean φ (nats)",
            "χ natural ×1e3",
            "χ first copy ×1e3",
            "χ second copy ×1e3",
            "95 % CI second ×1e3",
            "second − first ×1e3",
        ]
    )
    return md_table(header, rows)


def report(results: dict[str, Any]) -> str:
    lines = ["# Do susceptibilities single out the induction heads?", ""]
    for s in results["settings"]:
        lines += [
            f"## nβ = {s['nbeta']:g}, ε = {s['step_size']:g}, "
            f"posterior on {s['posterior_data']} data",
            "",
        ]
        lines.append(_group_table(s["heads"], "head"))
        lines += ["", _contrast_summary(s["heads"])]
        lines += ["", "Best PCA margin over PCs 1-3 (positive = the top heads separated):", ""]
        lines.append(md_table(["top heads, rows", "margin"], list(s["best_pca_margin"].items())))
        lines.append("")
    sections = [
        ("joint", "Layer-1 heads sampled jointly (nβ = 30, ε = 0.001, natural data)", "heads"),
        (
            "circuits",
            "Heads split into their QK and OV circuits, and OV into its weights without b_V "
            "and W_O alone (nβ = 30, γ = 300, ε = 0.001, natural data)",
            "circuit",
        ),
        (
            "strong_gamma",
            f"Whole heads at γ = {STRONG_GAMMA:g} (nβ = 30, ε = 0.001, natural data)",
            "head",
        ),
    ]
    for key, title, label in sections:
        if results.get(key):
            lines += [f"## {title}", "", _group_table(results[key], label), ""]
    lines.append("![contrast](induction_contrast.png)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return study_main(NAME, __doc__ or NAME, run_study, plots, report, argv)


if __name__ == "__main__":
    main()
