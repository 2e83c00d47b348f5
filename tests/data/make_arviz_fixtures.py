"""Write the cross-generation fixtures: a tiny saved run and the χ estimated from it.

ArviZ 0.x (Python 3.11) keeps a run in ``arviz.InferenceData``, ArviZ 1.x (Python ≥ 3.12)
in ``xarray.DataTree``; ``bayes_susc.save`` writes the same netCDF from either. This script
samples one tiny run (a linear regression, 2 chains x 40 draws, 6 probe items), saves it
with ``bayes_susc.save`` as ``arviz{MAJOR}_run.nc`` beside this file, estimates χ from the
file as loaded back, and writes those numbers with the versions that made them to
``arviz{MAJOR}_expected.json``. ``tests/test_arviz_fixtures.py`` loads the files of both
generations under whichever interpreter runs the suite and checks it gets these numbers.

Run it once under each generation, from the repository root:

    .venv/bin/python tests/data/make_arviz_fixtures.py      # Python 3.11, ArviZ 0.x
    .venv312/bin/python tests/data/make_arviz_fixtures.py   # Python 3.12, ArviZ 1.x
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

import bayes_susc as bs
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.storage.draws import arviz_major, to_jsonable

HERE = Path(__file__).resolve().parent
NUM_PROBE = 6
ESTIMATE_VARS = ("chi", "se", "ci_low", "ci_high", "p_value", "rhat", "ess_bulk", "ess_tail")


def squared_error(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Per-item squared error of a linear regression (unreduced)."""
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def make_run():
    """The tiny run: nn.Linear(3, 1) fitted by least squares, all 4 weights sampled."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.tensor([1.0, -2.0, 0.5])

    def batch(n: int):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        return x, x @ w_true.double() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)

    train = [batch(16), batch(16)]
    model = torch.nn.Linear(3, 1).double()
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    fit = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    with torch.no_grad():
        model.weight.copy_(fit[:3][None])
        model.bias.copy_(fit[3:])
    posterior = bs.LocalPosterior(model, squared_error, train, ["weight", "bias"])
    return bs.sample(
        posterior,
        "sgld",
        step_size=1e-3,
        eval_data=batch(16),
        probe_data=batch(NUM_PROBE),
        num_chains=2,
        num_draws=40,
        num_burnin=10,
        seed=7,
        probe_coords={"token": [f"item{i}" for i in range(NUM_PROBE)]},
        progress=False,
    )


def main() -> None:
    major = arviz_major()
    run_path = HERE / f"arviz{major}_run.nc"
    bs.save(make_run(), run_path)
    est = estimate(bs.load(run_path))
    expected = {
        "made_with": {
            "python": platform.python_version(),
            **{d: version(d) for d in ("arviz", "xarray", "numpy", "scipy", "netCDF4", "torch")},
        },
        "container": type(bs.load(run_path)).__name__,
        "token": [str(t) for t in est["token"].values],
        "estimate": {name: to_jsonable(np.asarray(est[name].values)) for name in ESTIMATE_VARS},
    }
    out = HERE / f"arviz{major}_expected.json"
    out.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {run_path.name} ({run_path.stat().st_size} bytes) and {out.name}")


if __name__ == "__main__":
    main()
