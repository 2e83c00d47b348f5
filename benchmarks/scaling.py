"""How sampling time grows with components, chains, probe tokens and model width.

One factor varies at a time around a base point (2-layer, 8-head attention-only model,
d_model 64, context 64, minibatch 16 sequences; 4 chains; 1,008 probe tokens; one
layer-0 head); each point times ``bayes_susc.sample`` (SGLD, ``--steps`` steps with an
observable evaluation after each, as in the peer benchmark) end to end, best of
``--repeats``. Components are sampled one after another, so their time adds up.
Writes ``--out DIR/results.json`` and ``DIR/scaling.png`` (log-log, with the fitted
slope of each series: 1 means time proportional to the factor).

    python -m benchmarks.scaling [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bayes_susc import LocalPosterior, sample
from bayes_susc.demo.corpus import mixed_corpus
from bayes_susc.demo.model import (
    AttnOnlyConfig,
    AttnOnlyTransformer,
    head_components,
    next_token_loss,
)

BASE = {"components": 1, "chains": 4, "probe_tokens": 1008, "d_model": 64}
SEQ_LEN = 64


def time_point(
    components: int, chains: int, probe_tokens: int, d_model: int, steps: int, repeats: int
) -> float:
    """Best-of-``repeats`` wall-clock seconds to sample ``components`` layer-0 heads.

    Each head runs ``steps`` SGLD steps with chains vectorized and the observables (φ,
    eval loss, per-token probe losses of ``probe_tokens`` tokens in sequences of 64)
    evaluated after every step.
    """
    cfg = AttnOnlyConfig(n_layers=2, n_heads=8, d_model=d_model, d_head=d_model // 4, n_ctx=SEQ_LEN)
    model = AttnOnlyTransformer(cfg, generator=0)
    train, _ = mixed_corpus(64, SEQ_LEN, seed=0)
    eval_tokens, _ = mixed_corpus(16, SEQ_LEN, seed=1)
    n_probe = max(1, round(probe_tokens / (SEQ_LEN - 1)))
    probe, _ = mixed_corpus(n_probe, SEQ_LEN, seed=2)
    heads = head_components(model)[:components]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for head in heads:
            posterior = LocalPosterior(model, next_token_loss, list(train.split(16)), head)
            sample(
                posterior,
                "sgld",
                step_size=1e-3,
                eval_data=eval_tokens,
                probe_data=list(probe.split(16)),
                num_chains=chains,
                num_draws=steps,
                progress=False,
            )
        best = min(best, time.perf_counter() - start)
    return best


def _slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and steps")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scaling"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=None, help="SGLD steps per point")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 20)
    grid = {
        "components": [1, 2, 4] if args.quick else [1, 2, 4, 8],
        "chains": [1, 4, 16] if args.quick else [1, 2, 4, 8, 16],
        "probe_tokens": [252, 1008, 4032] if args.quick else [252, 1008, 4032, 16128],
        "d_model": [32, 64, 128] if args.quick else [32, 64, 128, 256],
    }
    results = {"steps": steps, "threads": torch.get_num_threads(), "base": BASE, "series": {}}
    for factor, values in grid.items():
        seconds = []
        for value in values:
            point = {**BASE, factor: value}
            t = time_point(**point, steps=steps, repeats=args.repeats)
            seconds.append(t)
            print(f"{factor:>13} = {value:>6}: {t:8.3f} s", flush=True)
        results["series"][factor] = {
            "values": values,
            "seconds": seconds,
            "loglog_slope": _slope(values, seconds),
        }
        print(f"{factor:>13}: log-log slope {results['series'][factor]['loglog_slope']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "scaling.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'scaling.png'}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, (factor, series) in zip(axes, results["series"].items()):
        x, y = np.array(series["values"], float), np.array(series["seconds"])
        ax.loglog(x, y, "o-")
        ax.loglog(x, y[0] * x / x[0], ":", color="grey", label="slope 1")
        ax.set_title(f"{factor} (slope {series['loglog_slope']:.2f})", fontsize=9)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(factor)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    fig.suptitle(f"bayes_susc.sample time, {results['steps']} SGLD steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
