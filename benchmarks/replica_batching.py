"""Does batching more replicas into one call pay? The ceiling of layer batching.

Issue 19 proposes sampling all heads of one layer x chains as one batch of replicas
(8 heads x 4 chains = 32 replicas per call) instead of one head's 4 chains per call. On
the shipped demo model, with the demo's data (64 probe windows, 16 evaluation windows,
minibatches of 16 x 64 tokens), this times ``bayes_susc.sample`` of one layer-0 and one
layer-1 head with R = 1, 4, 8, 16, 32 chains (replicas) in one vectorized call, and
prints milliseconds per replica-step, for steps with a kept draw (gradient + φ + every
probe loss) and for burn-in steps (gradient only). A layer batch runs the same number
of replicas through the same frozen-prefix split, so if the time per replica at R = 32
is not below that at R = 4, batching a layer cannot pay on this machine either.

    python -m benchmarks.replica_batching [--quick] [--out DIR] [--threads N]

Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bayes_susc import LocalPosterior, sample


def time_per_replica_step(
    posterior: LocalPosterior, spec, replicas: int, steps: int, draws: bool
) -> float:
    """Milliseconds per replica-step of ``steps`` steps (all kept draws, or all burn-in
    but two draws) of ``replicas`` vectorized chains."""
    kept = steps if draws else 2
    start = time.perf_counter()
    sample(
        posterior,
        "sgnht",
        step_size=0.03,
        diffusion=30.0,
        eval_data=spec.eval_data,
        probe_data=spec.probe_data,
        num_chains=replicas,
        num_draws=kept,
        num_burnin=steps - kept,
        progress=False,
    )
    return 1000 * (time.perf_counter() - start) / (steps * replicas)


def main(argv: list[str] | None = None) -> dict:
    from bayes_susc.demo.preset import DemoSettings, demo_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and replica counts")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_replica_batching"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = (1, 4, 16) if args.quick else (1, 4, 8, 16, 32)
    steps = 4 if args.quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        spec = demo_spec(Path(tmp), DemoSettings())
    heads = {c.name: c for c in spec.components}
    rows = []
    for name in ("L0H3", "L1H3"):
        posterior = LocalPosterior(
            spec.model, spec.loss_fn, spec.train_data, heads[name], nbeta=30.0, gamma=300.0
        )
        time_per_replica_step(posterior, spec, 2, 2, draws=True)  # warm-up
        for replicas in counts:
            row = {
                "head": name,
                "replicas": replicas,
                "ms_per_replica_draw_step": time_per_replica_step(
                    posterior, spec, replicas, steps, draws=True
                ),
                "ms_per_replica_burnin_step": time_per_replica_step(
                    posterior, spec, replicas, steps, draws=False
                ),
            }
            rows.append(row)
            print(
                f"{name} R={replicas:3d}: {row['ms_per_replica_draw_step']:7.1f} ms per "
                f"replica-step with a draw, {row['ms_per_replica_burnin_step']:7.1f} without",
                flush=True,
            )
    for name in ("L0H3", "L1H3"):
        at = {r["replicas"]: r for r in rows if r["head"] == name}
        ratio = at[max(counts)]["ms_per_replica_draw_step"] / at[4]["ms_per_replica_draw_step"]
        print(f"{name}: time per replica at R={max(counts)} / at R=4 = {ratio:.2f}")
    result = {"threads": args.threads, "steps": steps, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
