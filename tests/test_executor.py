"""Executors: chain groups run as separate jobs (in-process or on a local Ray cluster)
merge back into the numbers of one ``sample()`` call with all chains, and bad input
fails before any job runs.

Measured on CPU (float32), and asserted:
- the same jobs give the same bits in this process and on Ray workers;
- grouped == single call *bit for bit* for the linear model and the attention-only
  transformer (vectorized groups of 1 or 2 of 4 chains, and sequential): every job walks
  the same minibatch schedule with chain k's own noise stream, and vmap's per-chain
  arithmetic does not depend on the number of chains here;
- but not always: for an MLP's readout layer, vmap over 1 chain rounds differently from
  vmap over 2 or 4. Worst over 200 draws x 4 chains: 1.2e-7 absolute in phi and the
  losses (~0.5, 1-2 ulps), 3e-7 relative in potential, grad_norm and distance; that
  test allows rtol = 1e-5, atol = 1e-6 (the worst entry uses 12% of it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import sys
import time
import tomllib
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from bayes_susc import Component, DivergenceWarning, LocalPosterior, get_group, load, sample, save
from bayes_susc.demo.model import AttnOnlyConfig, AttnOnlyTransformer, next_token_loss
from bayes_susc.pipeline.config import ConfigError, prepare, run_from_config, spec_from_config
from bayes_susc.sampling.executor import (
    LocalExecutor,
    Problem,
    ProcessExecutor,
    RayExecutor,
    concat_chains,
    iter_components,
    make_executor,
    plan_jobs,
    sample_components,
    select_chains,
)
from bayes_susc.storage.draws import group_names

TINY = AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, d_head=8, n_ctx=16)
WQ = "blocks.0.attn.W_Q"
SETTINGS = dict(num_chains=4, num_draws=12, num_burnin=3, seed=3)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------------ problems
def sq_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, t = batch
    return 0.5 * (model(x).squeeze(-1) - t) ** 2


def linear_problem(seed: int = 0) -> Problem:
    """A Linear(3, 1) at (nearly) its least-squares fit, 3 training batches: a picklable
    factory, which Ray workers call by name.

    Built bit for bit the same in every process: a LAPACK least-squares solve may differ
    in the last bit between calls (seen here: 1 ulp of the anchor loss between two
    builds in one process), so the solution is rounded to 4 decimals, which no such
    difference moves. A factory must be this deterministic for workers that rebuild the
    problem to give the driver's numbers exactly."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(48, 3, generator=g)
    y = (X * torch.tensor([1.0, -2.0, 0.5])).sum(-1) + 0.3 * torch.randn(48, generator=g)
    model = torch.nn.Linear(3, 1)
    A = torch.cat([X, torch.ones(48, 1)], dim=1).double()
    sol = torch.linalg.lstsq(A, y.double().unsqueeze(-1)).solution.squeeze(-1)
    sol = (torch.round(sol * 1e4) / 1e4).float()
    with torch.no_grad():
        model.weight.copy_(sol[:3].unsqueeze(0))
        model.bias.copy_(sol[3:])
    return Problem(
        model,
        sq_loss,
        [(X[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)],
        eval_data=[(X[:24], y[:24]), (X[24:], y[24:])],
        probe_data=[(X[:3], y[:3]), (X[3:7], y[3:7])],
        probe_coords={"item": [f"x{i}" for i in range(7)]},
    )


def transformer_problem() -> Problem:
    model = AttnOnlyTransformer(TINY, generator=1)
    tokens = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(1))
    return Problem(model, next_token_loss, [tokens[:4], tokens[4:]], tokens, tokens[:2])


LINEAR_COMPONENTS = [
    Component.from_parameters("weight", ["weight"]),
    Component.from_parameters("bias", ["bias"]),
]
HEADS = [Component("L0H0", {WQ: (0,)}), Component("L0H1", {WQ: (1,)})]


def single_runs(problem: Problem, components, *, kernel="sgld", **kw) -> dict:
    """The reference: one plain sample() call per component, all chains."""
    out = {}
    for comp in components:
        post = LocalPosterior(problem.model, problem.loss_fn, problem.train_data, comp)
        out[comp.name] = sample(
            post,
            kernel,
            eval_data=problem.eval_data,
            probe_data=problem.probe_data,
            probe_coords=problem.probe_coords,
            **kw,
        )
    return out


def assert_same_run(got, want, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Same groups, coordinates and attrs (but the time); the same numbers bit for bit,
    or to ``|got - want| <= atol + rtol |want|`` if a tolerance is given."""
    assert sorted(group_names(got)) == sorted(group_names(want))
    for g in group_names(want):
        a, b = get_group(got, g), get_group(want, g)
        if rtol or atol:
            xr.testing.assert_allclose(a.drop_attrs(), b.drop_attrs(), rtol=rtol, atol=atol)
        else:
            xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
        strip = lambda attrs: {k: v for k, v in attrs.items() if k != "created_at"}  # noqa: E731
        assert strip(a.attrs) == strip(b.attrs), g


# ---------------------------------------------------------------- sample(chains=...)
def test_sample_chain_subset_is_those_chains_of_the_full_run():
    p = linear_problem()
    full = single_runs(p, LINEAR_COMPONENTS[:1], **SETTINGS)["weight"]
    post = LocalPosterior(p.model, p.loss_fn, p.train_data, LINEAR_COMPONENTS[0])
    part = sample(post, eval_data=p.eval_data, probe_data=p.probe_data, chains=[3, 1], **SETTINGS)
    for g in ("posterior", "sample_stats"):
        a, b = get_group(part, g), get_group(full, g)
        assert a["chain"].values.tolist() == [3, 1]
        for k in b.data_vars:
            np.testing.assert_array_equal(a[k].values, b[k].sel(chain=[3, 1]).values, err_msg=k)
    config = json.loads(get_group(part, "posterior").attrs["bayes_susc_config"])
    full_config = json.loads(get_group(full, "posterior").attrs["bayes_susc_config"])
    assert config["chains"] == [3, 1] and config["num_chains"] == 4
    assert config["chain_seeds"] == [full_config["chain_seeds"][k] for k in (3, 1)]
    assert "chains" not in full_config
    # The chains of one run really differ (so equal numbers above are not a tautology).
    phi = get_group(full, "posterior")["phi"].values
    assert not np.array_equal(phi[1], phi[3])


@pytest.mark.parametrize(
    ("chains", "error", "match"),
    [
        ([4], ValueError, r"distinct indices in \[0, num_chains=4\)"),
        ([1, 1], ValueError, "distinct"),
        ([], ValueError, "at least one"),
        ([-1], ValueError, "chain index must be >= 0"),
        ([0.5], TypeError, "chain index must be an int"),
        ("01", TypeError, "sequence of chain indices"),
    ],
)
def test_sample_rejects_bad_chains(chains, error, match):
    p = linear_problem()
    post = LocalPosterior(p.model, p.loss_fn, p.train_data, LINEAR_COMPONENTS[1])
    with pytest.raises(error, match=match):
        sample(post, eval_data=p.eval_data, probe_data=p.probe_data, chains=chains, num_chains=4)


# --------------------------------------------------------------------- local executor
@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_local_groups_of_two_equal_one_sample_call(chain_method):
    p = linear_problem()
    kw = dict(SETTINGS, chain_method=chain_method)
    want = single_runs(p, LINEAR_COMPONENTS, **kw)
    got = sample_components(p, LINEAR_COMPONENTS, chains_per_job=2, **kw)
    assert list(got) == ["weight", "bias"]
    for name in want:
        assert_same_run(got[name], want[name])
        assert get_group(got[name], "posterior").sizes["chain"] == 4


@pytest.mark.parametrize(("kernel", "per"), [("sghmc", 1), ("mala", 2)])
def test_local_groups_transformer_heads(kernel, per):
    """Kernels with state (momentum) and with uniform draws (MALA's accept step), and a
    vmapped transformer: still bit for bit."""
    p = transformer_problem()
    kw = dict(num_chains=4, num_draws=6, seed=5, kernel=kernel)
    want = single_runs(p, HEADS, **kw)
    got = sample_components(p, HEADS, chains_per_job=per, executor="local", **kw)
    for name in want:
        assert_same_run(got[name], want[name])


def test_one_job_per_component_is_the_plain_call_and_factory_works():
    # chains_per_job=None (or = num_chains): no chains keyword reaches sample() at all.
    want = single_runs(linear_problem(), LINEAR_COMPONENTS, kernel="sgld", **SETTINGS)
    got = sample_components(linear_problem, LINEAR_COMPONENTS, **SETTINGS)
    for name in want:
        assert_same_run(got[name], want[name])


def test_merged_divergences_match_the_single_run():
    """At step size 0.02 (past SGLD's stability limit here) every chain blows up, at
    steps 50-52 depending on its noise. The merged attrs list the diverged chains and
    their steps as one run would, and each job's warning reaches the caller naming the
    chains by their index in the full run."""
    p = linear_problem()
    kw = dict(num_chains=4, num_draws=60, seed=1, step_size=0.02)
    with pytest.warns(DivergenceWarning):
        want = single_runs(p, LINEAR_COMPONENTS[:1], **kw)["weight"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sample_components(p, LINEAR_COMPONENTS[:1], chains_per_job=2, **kw)["weight"]
    assert_same_run(got, want)
    config = json.loads(get_group(got, "posterior").attrs["bayes_susc_config"])
    assert config["diverged_chains"] == [0, 1, 2, 3]
    assert min(config["diverged_at_step"]) >= 40 and len(set(config["diverged_at_step"])) > 1
    assert get_group(got, "posterior").attrs["num_diverged_chains"] == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, DivergenceWarning)]
    assert len(messages) == 2
    assert "chain(s) [0, 1] of component 'weight'" in messages[0]
    assert "chain(s) [2, 3] of component 'weight'" in messages[1]


def test_concat_chains_any_order_datatree_and_file_roundtrip(tmp_path):
    p = linear_problem()
    post = LocalPosterior(p.model, p.loss_fn, p.train_data, LINEAR_COMPONENTS[0])
    kw = dict(eval_data=p.eval_data, probe_data=p.probe_data, backend="datatree", **SETTINGS)
    whole = sample(post, **kw)
    parts = [sample(post, chains=c, **kw) for c in ([2, 3], [0], [1])]
    merged = concat_chains(parts)
    assert type(merged) is type(whole)
    assert_same_run(merged, whole)
    # A partial merge keeps saying which chains it holds.
    partial_merge = concat_chains(parts[:2])
    config = json.loads(get_group(partial_merge, "posterior").attrs["bayes_susc_config"])
    assert config["chains"] == [0, 2, 3]
    path = save(merged, tmp_path / "weight.nc")
    assert_same_run(load(path, backend="datatree"), whole)


def test_concat_chains_refuses_parts_of_different_runs():
    p = linear_problem()
    post = LocalPosterior(p.model, p.loss_fn, p.train_data, LINEAR_COMPONENTS[0])
    kw = dict(eval_data=p.eval_data, probe_data=p.probe_data, num_chains=4, num_draws=5)
    a = sample(post, chains=[0, 1], seed=0, **kw)
    with pytest.raises(ValueError, match=r"not from the same run.*seed"):
        concat_chains([a, sample(post, chains=[2, 3], seed=1, **kw)])
    with pytest.raises(ValueError, match="overlap in chains"):
        concat_chains([a, sample(post, chains=[1, 2], seed=0, **kw)])
    with pytest.raises(ValueError, match="at least one part"):
        concat_chains([])


# --------------------------------------------------------------------------- bad input
class NeverRun:
    """An executor that fails the test if any job is submitted."""

    def map(self, fn, shared, jobs):
        raise AssertionError("a job was submitted before the input was checked")


def _not_a_problem():
    return {"model": None}


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"executor": "dask"}, ValueError, "unknown executor 'dask'"),
        ((), {"executor": object()}, TypeError, r"map\(fn, shared, jobs\)"),
        ((), {"chains_per_job": 3}, ValueError, r"chains_per_job=3 must divide num_chains=4.*"),
        ((), {"chains_per_job": 0}, ValueError, "chains_per_job must be >= 1"),
        ((), {"chains_per_job": 2.0}, TypeError, "chains_per_job must be an int"),
        ((), {"num_chains": 0}, ValueError, "num_chains must be >= 1"),
        ((), {"kernel": "nope"}, ValueError, "unknown kernel 'nope'"),
        ((), {"friction": 0.1}, TypeError, "friction"),
        ((), {"num_draws": 0}, ValueError, "num_draws must be >= 1"),
        ((), {"chain_method": "parallel"}, ValueError, "chain_method must be"),
        ((), {"nbeta": -1.0}, ValueError, "nbeta must be > 0"),
        ((), {"eval_data": None}, TypeError, r"sets \['eval_data'\] itself"),
        ((), {"chains": [0]}, TypeError, r"sets \['chains'\] itself"),
        ((), {"store": "draws.zarr"}, ValueError, r"does not take \['store'\]"),
        (([Component.from_parameters("w", ["nope"])],), {}, ValueError, "unknown parameter"),
        # Every component is resolved before any job, not only the first.
        (
            ([*LINEAR_COMPONENTS, Component.from_parameters("w", ["nope"])],),
            {},
            ValueError,
            "unknown parameter",
        ),
        ((LINEAR_COMPONENTS * 2,), {}, ValueError, r"unique.*\['bias', 'weight'\]"),
        (([],), {}, TypeError, "non-empty sequence of Component"),
        ((["weight"],), {}, TypeError, "non-empty sequence of Component"),
    ],
)
def test_bad_input_fails_before_any_job(args, kwargs, error, match):
    components = args[0] if args else LINEAR_COMPONENTS
    kwargs = {"executor": NeverRun(), "num_chains": 4, "num_draws": 3, **kwargs}
    with pytest.raises(error, match=match):
        sample_components(linear_problem(), components, **kwargs)


def test_bad_problem_fails_before_any_job():
    with pytest.raises(TypeError, match="must return a bayes_susc.sampling.executor.Problem"):
        sample_components(_not_a_problem, LINEAR_COMPONENTS, executor=NeverRun())
    with pytest.raises(TypeError, match="problem must be a Problem or a zero-argument"):
        sample_components("problem.pt", LINEAR_COMPONENTS, executor=NeverRun())


def test_plan_and_local_executor_are_lazy_and_ordered():
    jobs = plan_jobs(LINEAR_COMPONENTS, 6, 2, {"nbeta": 1.0}, {"seed": 4})
    assert [(j.component.name, j.chains) for j in jobs] == [
        ("weight", (0, 1)),
        ("weight", (2, 3)),
        ("weight", (4, 5)),
        ("bias", (0, 1)),
        ("bias", (2, 3)),
        ("bias", (4, 5)),
    ]
    assert plan_jobs(LINEAR_COMPONENTS, 6, 6)[0].chains is None
    seen = []
    results = LocalExecutor().map(lambda s, j: seen.append(j) or s + j, 10, [1, 2, 3])
    assert seen == []  # nothing runs until asked for
    assert next(results) == 11 and seen == [1]
    assert list(results) == [12, 13]
    assert isinstance(make_executor(None), LocalExecutor)
    # iter_components hands each component over once its chain groups are done.
    it = iter_components(linear_problem(), LINEAR_COMPONENTS, chains_per_job=2, **SETTINGS)
    name, data = next(it)
    assert name == "weight" and get_group(data, "posterior").sizes["chain"] == 4


# ------------------------------------------------------------ jobs for worker processes
def _worker_pid(shared: float, job: int) -> tuple[int, int]:
    time.sleep(shared)  # long enough that both workers get a job
    return job, os.getpid()


def _fail(shared, job):
    raise ValueError(f"job {job} failed on purpose")


def _worker_state(shared: list, job: int) -> tuple[int, int, int]:
    """(job, torch threads, id of the shared object) in the worker that ran it."""
    time.sleep(0.3)
    return job, torch.get_num_threads(), id(shared)


def _allocator_setting(shared, job):
    from bayes_susc.sampling.allocator import applied_top_pad

    return applied_top_pad()


# ---------------------------------------------------------------- local worker processes
@pytest.fixture(scope="module")
def process_pool():
    """Two single-threaded worker processes, started once for this module's tests."""
    with ProcessExecutor(2, threads_per_worker=1) as ex:
        ex.start()
        yield ex


def test_processes_run_in_two_workers_in_job_order_and_raise_job_errors(process_pool):
    assert len(multiprocessing.active_children()) >= 2  # start() started both
    out = list(process_pool.map(_worker_pid, 0.5, [0, 1, 2, 3]))
    assert [job for job, _ in out] == [0, 1, 2, 3]  # job order, whatever finished first
    assert len({pid for _, pid in out}) == 2
    assert os.getpid() not in {pid for _, pid in out}
    # Each worker unpickles a call's shared object once: all its jobs see one copy.
    state = list(process_pool.map(_worker_state, [1.0] * 1000, range(6)))
    assert {threads for _, threads, _ in state} == {1}
    assert len({ident for _, _, ident in state}) <= 2
    with pytest.raises(ValueError, match="job 1 failed on purpose"):
        list(process_pool.map(_fail, None, [1]))
    assert list(process_pool.map(_worker_pid, 0.0, [7]))[0][0] == 7  # the pool survives


@pytest.mark.parametrize("ship", ["factory", "problem"])
def test_processes_give_the_numbers_of_the_local_run(process_pool, ship):
    """2 components x 4 chains in groups of 2 on 2 worker processes == one sample() call
    per component, bit for bit (and the same attrs); heads of a transformer as well."""
    problem = partial(linear_problem, 0) if ship == "factory" else linear_problem(0)
    kw = dict(SETTINGS, kernel="sghmc")
    got = sample_components(
        problem, LINEAR_COMPONENTS, executor=process_pool, chains_per_job=2, **kw
    )
    want = single_runs(linear_problem(0), LINEAR_COMPONENTS, **kw)
    assert list(got) == ["weight", "bias"]
    for name in want:
        assert_same_run(got[name], want[name])
    heads = sample_components(transformer_problem(), HEADS, executor=process_pool, **SETTINGS)
    for name, want_head in single_runs(transformer_problem(), HEADS, **SETTINGS).items():
        assert_same_run(heads[name], want_head)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be >= 1, got 0"),
        ({"threads_per_worker": 0}, ValueError, "threads_per_worker must be >= 1, got 0"),
        ({"initializer": 3}, TypeError, "initializer must be callable or None, got 3"),
    ],
)
def test_process_executor_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProcessExecutor(**kwargs)


def test_workers_take_the_allocator_setting_of_their_parent(monkeypatch):
    from bayes_susc.sampling import allocator

    monkeypatch.setitem(allocator._APPLIED, "top_pad", None)
    with ProcessExecutor(1) as ex:
        assert list(ex.map(_allocator_setting, None, [0])) == [None]
    # As if this process had called keep_freed_memory(2**20) (the CLI does, at start).
    monkeypatch.setitem(allocator._APPLIED, "top_pad", 2**20)
    with ProcessExecutor(1) as ex:
        want = 2**20 if sys.platform.startswith("linux") else None
        assert list(ex.map(_allocator_setting, None, [0])) == [want]


def test_leaving_the_block_on_an_error_stops_running_jobs_at_once():
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with ProcessExecutor(1) as ex:
            results = ex.map(_worker_pid, 60.0, [0, 1])  # a minute each
            time.sleep(0.5)
            raise KeyboardInterrupt  # as Ctrl-C would, while job 0 runs
    assert time.perf_counter() - start < 30  # not after the running job's minute
    assert ex._pool is None
    with pytest.raises(Exception):  # noqa: B017  (cancelled or broken: never a result)
        next(results)


def test_process_executor_refuses_what_cannot_reach_a_worker():
    ex = ProcessExecutor(1)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError), match="pickle"):
        ex.map(_worker_pid, lambda: None, [0])
    assert ex._pool is None  # refused before any process started
    assert isinstance(make_executor("processes"), ProcessExecutor)


# --------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs (2 workers), started by the test; yields Ray and
    its start-up time (s)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray>=2.9')")
    if ray.is_initialized():
        ray.shutdown()
    # Workers import this module (and the problem factories in it) and the examples'
    # factories by name, so both folders go on their PYTHONPATH: set while the cluster
    # starts, its processes inherit it. (A runtime_env would do the same, at several
    # seconds of extra worker start-up.)
    here = os.path.dirname(os.path.abspath(__file__))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, str(EXAMPLES), old) if p)
    start = time.perf_counter()
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            # Everything on loopback; no log streaming (a failing job still raises here).
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=100 * 1024**2,  # the jobs' data is tiny
        )
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    startup_s = time.perf_counter() - start
    yield ray, startup_s
    ray.shutdown()


def test_ray_runs_on_two_workers_and_raises_job_errors(ray_cluster):
    ray, startup_s = ray_cluster
    assert startup_s < 30, f"Ray took {startup_s:.1f} s to start"
    ex = RayExecutor()
    assert ray.cluster_resources()["CPU"] == 2
    out = list(ex.map(_worker_pid, 0.5, [0, 1, 2, 3]))
    assert [job for job, _ in out] == [0, 1, 2, 3]  # job order, whatever finished first
    assert len({pid for _, pid in out}) == 2
    assert os.getpid() not in {pid for _, pid in out}
    with pytest.raises(ValueError, match="job 1 failed on purpose"):
        list(ex.map(_fail, None, [1]))
    ex.shutdown()  # did not start the cluster: leaves it running
    assert ray.is_initialized()


@pytest.mark.parametrize("ship", ["factory", "problem"])
def test_ray_gives_the_numbers_of_the_local_run(ray_cluster, ship):
    """2 components x 4 chains in groups of 2 on 2 Ray workers == the local grouped run
    == one sample() call per component, bit for bit (and the same attrs)."""
    problem = partial(linear_problem, 0) if ship == "factory" else linear_problem(0)
    kw = dict(SETTINGS, kernel="sghmc")
    local = sample_components(problem, LINEAR_COMPONENTS, chains_per_job=2, **kw)
    remote = sample_components(
        problem, LINEAR_COMPONENTS, executor=RayExecutor(), chains_per_job=2, **kw
    )
    want = single_runs(linear_problem(0), LINEAR_COMPONENTS, **kw)
    assert list(remote) == ["weight", "bias"]
    for name in want:
        assert_same_run(remote[name], local[name])
        assert_same_run(remote[name], want[name])


# --------------------------------------------------------------------- run configs
SMALL = {
    "model": {"kwargs": {"train_steps": 30}},
    "sampling": {"num_chains": 2, "num_draws": 8, "num_burnin": 2},
    "estimate": {"n_resamples": 20},
}


@pytest.mark.parametrize(
    ("run", "match"),
    [
        (
            {"executor": "dask"},
            r"\[run.executor\] must be 'local', 'processes' or 'ray', got 'dask'",
        ),
        ({"chains_per_job": 3}, r"\[run.chains_per_job\] must be >= 1 and divide .* = 2, got 3"),
        ({"chains_per_job": 0}, r"\[run.chains_per_job\] must be >= 1"),
        ({"address": "auto"}, r"\[run.address\] applies only with executor = 'ray'"),
        ({"workers": 2}, r"\[run.workers\] applies only with executor = 'processes'"),
        ({"executor": "processes", "workers": 0}, r"\[run.workers\] must be >= 1, got 0"),
        (
            {"executor": "processes", "threads_per_worker": 0},
            r"\[run.threads_per_worker\] must be >= 1, got 0",
        ),
        ({"nodes": 2}, r"unknown key 'nodes' in \[run\]"),
    ],
)
def test_run_config_rejects_bad_run_table(run, match):
    with pytest.raises(ConfigError, match=match):
        prepare(EXAMPLES / "custom_factory.toml", overrides={**SMALL, "run": run})


def _config_problem(p) -> tuple[Problem, dict]:
    """A prepared config's Problem and sample_components keywords, for runs in this
    process to compare a run folder with."""
    d, s = p.data, p.config["sampling"]
    problem = Problem(
        p.model, d["loss_fn"], d["train_data"], d["eval_data"], d["probe_data"], d["probe_coords"]
    )
    kw = dict(
        nbeta=s["nbeta"],
        gamma=s["gamma"],
        **{k: s[k] for k in ("num_chains", "num_draws", "num_burnin", "seed", "step_size")},
    )
    return problem, kw


def test_run_config_ray_executor_matches_local(tmp_path, ray_cluster, monkeypatch):
    """`[run] executor = "ray"`, one chain per job: the component files hold the numbers
    of the same jobs run locally (bit for bit), and of one plain sample() call per
    component to float rounding: for this MLP's readout layer, vmap over one chain
    rounds differently from vmap over two (measured: at most 6e-8 absolute in eval_loss
    ~0.58, 3.8e-6 in potential ~16; see the module docstring)."""
    # The example's config without its python_path: the fixture's workers already
    # import my_factories, and a python_path would start new workers (its runtime_env),
    # several seconds more. That python_path reaches the executor is checked below.
    config = tomllib.loads((EXAMPLES / "custom_factory.toml").read_text())
    del config["python_path"]
    monkeypatch.syspath_prepend(str(EXAMPLES))
    ray_run = {**SMALL, "run": {"executor": "ray", "chains_per_job": 1}}
    summary = run_from_config(config, out=tmp_path / "ray", progress=False, overrides=ray_run)
    assert summary["computed_this_run"] == ["hidden", "readout"]
    p = prepare(EXAMPLES / "custom_factory.toml", overrides=ray_run)
    assert p.fingerprint == summary["model"]["fingerprint"]
    assert p.python_path == [EXAMPLES.resolve()]
    ex = spec_from_config(p).execution.make_executor()
    assert isinstance(ex, RayExecutor) and ex.address is None
    assert ex.runtime_env == {"env_vars": {"PYTHONPATH": str(EXAMPLES.resolve())}}
    problem, kw = _config_problem(p)
    same_jobs = sample_components(problem, p.components, chains_per_job=1, **kw)
    one_call = sample_components(problem, p.components, **kw)
    for name in ("hidden", "readout"):
        got = load(tmp_path / "ray" / "components" / f"{name}.nc")
        assert_same_run(got, same_jobs[name])
        assert_same_run(got, one_call[name], rtol=1e-5, atol=1e-6)


def test_run_config_process_executor_matches_local(tmp_path):
    """`[run] executor = "processes"` with 2 workers, one chain per job: the component
    files hold the numbers of the same jobs run in this process, bit for bit. The
    workers import the config's factories through its python_path."""
    run = {"executor": "processes", "workers": 2, "chains_per_job": 1}
    overrides = {**SMALL, "run": run}
    summary = run_from_config(
        EXAMPLES / "custom_factory.toml",
        out=tmp_path / "proc",
        progress=False,
        overrides=overrides,
    )
    assert summary["computed_this_run"] == ["hidden", "readout"]
    p = prepare(EXAMPLES / "custom_factory.toml", overrides=overrides)
    ex = spec_from_config(p).execution.make_executor()
    assert isinstance(ex, ProcessExecutor) and (ex.workers, ex.threads_per_worker) == (2, 1)
    problem, kw = _config_problem(p)
    same_jobs = sample_components(problem, p.components, chains_per_job=1, **kw)
    for name in ("hidden", "readout"):
        assert_same_run(load(tmp_path / "proc" / "components" / f"{name}.nc"), same_jobs[name])


# ------------------------------------------------------------------ extending a run
@pytest.mark.parametrize("per", [None, 2])
def test_extending_through_jobs_equals_the_longer_run(per):
    """Components sampled in two rounds through the executor (the second from the
    first's saved state, each job extending its own chains) equal one uninterrupted
    run of the total length, bit for bit; a component absent from resume_from starts
    at w*."""
    p = linear_problem()
    kw = dict(SETTINGS, num_draws=4, keep_state=True)
    first = sample_components(p, LINEAR_COMPONENTS, chains_per_job=per, **kw)
    longer = single_runs(p, LINEAR_COMPONENTS, **dict(kw, num_draws=7))
    extended = sample_components(
        p,
        LINEAR_COMPONENTS,
        chains_per_job=per,
        resume_from={"weight": first["weight"]},
        **dict(kw, num_draws=3),
    )
    assert_same_run(extended["weight"], longer["weight"])
    assert get_group(extended["bias"], "posterior").sizes["draw"] == 3


def test_select_chains_is_the_inverse_of_concat_chains():
    p = linear_problem()
    kw = dict(SETTINGS, num_draws=4, keep_state=True)
    run = single_runs(p, LINEAR_COMPONENTS[:1], **kw)["weight"]
    parts = [select_chains(run, [2, 3]), select_chains(run, [0, 1])]
    assert_same_run(concat_chains(parts), run)
    alone = single_runs(p, LINEAR_COMPONENTS[:1], chains=[2, 3], **kw)["weight"]
    for name in group_names(alone):
        xr.testing.assert_identical(
            get_group(parts[0], name).drop_attrs(), get_group(alone, name).drop_attrs()
        )
    config = [json.loads(get_group(r, "posterior").attrs["bayes_susc_config"]) for r in parts]
    assert config[0] == json.loads(get_group(alone, "posterior").attrs["bayes_susc_config"])
    assert config[1]["chains"] == [0, 1] and config[1]["chain_seeds"] != config[0]["chain_seeds"]
    with pytest.raises(ValueError, match="distinct chains"):
        select_chains(run, [0, 0])
    with pytest.raises(ValueError, match="not sampled here"):
        sample_components(p, LINEAR_COMPONENTS[:1], resume_from={"bias": run}, **kw)
