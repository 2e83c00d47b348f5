"""Throughput of vectorized chains against a plain per-chain loop of the same kernel.

Both sides run ``bayes_susc.sample`` on the same small transformer head, data and
seeds; the only difference is ``chain_method``: ``"vectorized"`` (one vmapped forward
and backward for all chains) or ``"sequential"`` (one chain after another). Prints
replica-steps per second and the ratio, and writes ``--out DIR/results.json``.

    python -m benchmarks.vectorized_chains [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bayes_susc import LocalPosterior, sample
from bayes_susc.demo.corpus import mixed_corpus
from bayes_susc.demo.model import (
    AttnOnlyConfig,
    AttnOnlyTransformer,
    head_components,
    next_token_loss,
)


def _time(posterior, method: str, chains: int, steps: int, eval_tokens, probe_tokens) -> float:
    start = time.perf_counter()
    sample(
        posterior,
        "sgld",
        eval_data=eval_tokens,
        probe_data=probe_tokens,
        num_chains=chains,
        num_draws=2,
        num_burnin=steps - 2,
        chain_method=method,
        progress=False,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and chain counts")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_vectorized"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AttnOnlyConfig(n_layers=2, n_heads=8, d_model=128, d_head=16, n_ctx=64)
    model = AttnOnlyTransformer(cfg, generator=0)
    tokens, _ = mixed_corpus(64, cfg.n_ctx, seed=0)
    train_batches = list(tokens.split(8))
    eval_tokens, probe_tokens = tokens[:8], tokens[8:12]
    component = head_components(model)[cfg.n_heads + 3]  # a layer-1 head
    posterior = LocalPosterior(model, next_token_loss, train_batches, component)
    steps = 10 if args.quick else 40
    chain_counts = [1, 4] if args.quick else [1, 4, 8, 16]
    _time(posterior, "vectorized", 2, 3, eval_tokens, probe_tokens)  # warm-up
    rows = []
    print(
        f"model: 2 layers x 8 heads, d_model 128, batch 8 x {cfg.n_ctx} tokens; "
        f"component {component.name} ({posterior.dim} weights); {steps} SGLD steps; "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'chains':>6} {'vectorized rs/s':>16} {'per-chain loop rs/s':>20} {'speedup':>8}")
    for chains in chain_counts:
        vec = _time(posterior, "vectorized", chains, steps, eval_tokens, probe_tokens)
        seq = _time(posterior, "sequential", chains, steps, eval_tokens, probe_tokens)
        row = {
            "chains": chains,
            "steps": steps,
            "vectorized_s": vec,
            "sequential_s": seq,
            "vectorized_replica_steps_per_s": chains * steps / vec,
            "sequential_replica_steps_per_s": chains * steps / seq,
            "speedup": seq / vec,
        }
        rows.append(row)
        print(
            f"{chains:6d} {row['vectorized_replica_steps_per_s']:16.1f} "
            f"{row['sequential_replica_steps_per_s']:20.1f} {row['speedup']:8.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "vectorized_chains", "threads": torch.get_num_threads(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
