"""Run the demo pipeline on your own model and data, described by a TOML file.

``bayes-susc run CONFIG.toml`` (or :func:`run_from_config`) does what ``bayes-susc demo``
does — one InferenceData per component, the response matrix, figures and an HTML
report — for a model and data named in a config. Re-running into an existing run
folder resumes it: finished components (``components/<name>.nc``) are loaded, not
recomputed. The whole config is checked, and the model, data, components, kernel and
loss are built and tried once, *before* any sampling starts, so a typo fails in
seconds, not after the first hour.

Schema
------
.. code-block:: toml

    name = "my_run"            # optional; default: the config file's stem ("run" for a dict)
    out = "runs/my_run"        # optional; default "runs/<name>" (relative to the working dir)
    python_path = ["."]        # optional; folders prepended to sys.path for factories,
                               # relative to the config file's folder
    device = "cpu"             # optional; "cpu", "cuda", "cuda:1", ...

    [model]                    # exactly one of `factory` or `kind`
    factory = "pkg.mod:fn"     # fn(**kwargs) -> torch.nn.Module
    kwargs = {}                # (factory only)
    # kind = "transformer_lens"  -> HookedTransformer(HookedTransformerConfig(**config))
    # kind = "hf"                -> AutoModelForCausalLM.from_config(
    #                                  AutoConfig.for_model(model_type, **config))
    # config = {...}             a table, or the path of a JSON file (HF config.json)
    # model_type = "gpt2"        (hf; or config.model_type)
    # attn_implementation = "eager"  (hf; "eager" keeps chains vectorized under vmap)
    checkpoint = "model.pt"    # optional state dict: torch.load(weights_only=True), or
                               # safetensors by the ".safetensors" suffix; never pickle
    seed = 0                   # torch seed before the model is built (random init)

    [data]                     # exactly one of `factory` or `source`
    factory = "pkg.mod:fn"     # fn(**kwargs) -> {train_data, eval_data, probe_data,
    kwargs = {}                #   probe_coords (optional), loss_fn (optional)}
    # source = "stdlib_mixed"    byte corpus of stdlib code + pydoc prose (token ids 0..255)
    # seq_len = 64, n_train = 256, batch_size = 16, n_eval = 16, n_probe = 8, seed = 0,
    # code_fraction = 0.5
    loss = "pkg.mod:fn"        # optional loss_fn(model, batch) -> per-item losses;
                               # default: causal_lm_loss (next-token cross-entropy)

    [components]               # default: kind = "heads"
    kind = "heads"             # or "mlps", "kv_heads", "embeddings", "unembedding", "all",
                               # or a list of these (bayes_susc.target.architectures.components)
    regex = { attn0 = "^blocks\\.0\\.attn\\." }  # name -> pattern on parameter names
    include = ["L0H0", "L1H1"] # optional: keep only these components
    shared_kv = "exclude"      # grouped-query attention only

    [sampling]
    kernel = "sgld"            # any registered kernel
    step_size = 1e-3           # and the kernel's other hyperparameters (friction, ...)
    nbeta = 30.0
    gamma = 300.0
    num_chains = 4
    num_draws = 200
    num_burnin = 100
    steps_per_draw = 1
    seed = 0
    chain_method = "vectorized"

    [until]                    # optional: sample in rounds to a convergence target
    enabled = true             # false: exactly [sampling.num_draws] (as without the table)
    fraction = 0.99            # share of entries passing [estimate]'s R-hat, ESS and
                               # min_draws thresholds at which the run stops
    round_draws = 100          # draws per chain added per round to components below it
    max_draws = 2000           # most draws per chain of any component
    # time_budget = 240.0      # seconds from the start; no round ends after it

    [estimate]
    method = "ess_t"           # see bayes_susc.estimation.susceptibility
    confidence = 0.95
    min_ess = 100.0
    max_rhat = 1.01
    fdr = 0.05
    min_draws = 800            # kept draws pooled over chains, for the ess check
    n_resamples = 1000
    # block_length = 10.0      (block bootstraps; default chosen from the data)
    # seed = <sampling.seed>

    [run]                      # optional: where the sampling jobs run
    executor = "local"         # or "processes": worker processes on this machine, or
                               # "ray" (pip install 'bayes_susc[ray]'): one job per
                               # (component, chain group); same numbers as "local"
    # chains_per_job = 2       # chains per job, dividing num_chains (default: all)
    # workers = 2              # processes only (default: cores // threads_per_worker)
    # threads_per_worker = 1   # processes only: torch threads in each worker
    # address = "auto"         # ray only: a running cluster (default: start a local one)

With ``executor = "ray"`` the model and data are built here, checked, and shipped once
through Ray's object store; the ``python_path`` folders are put on the Ray workers'
``PYTHONPATH`` so they can import the factories' modules (the folders must exist on
every node). With ``executor = "processes"`` the same happens on this machine's
worker processes (:class:`bayes_susc.sampling.executor.ProcessExecutor`), which put the
``python_path`` folders on their ``sys.path``. Changing ``[run]`` does not change
results, so a run folder may be resumed with another executor.

Relative ``checkpoint``, ``python_path`` and a ``config`` file path are resolved against
the config file's folder (the working directory for a dict config); ``out`` against the
working directory.

Run folder
----------
The demo's layout, minus its demo-only files (``model.safetensors``, ``head_roles.nc``):
``config.toml`` (copy of the config), ``run_info.json`` (the model/data/sampling settings
and a fingerprint of the anchor weights, checked on resume: a run folder is never
continued with different weights or sampling settings), ``components/<name>.nc``,
``response_matrix.nc``, ``summary.json``, ``report.html`` and ``figures/*.png``
(:func:`bayes_susc.report.html.write_report`; with a single component, which that report's
PCA figures cannot show, a short report of tables is written instead).

Errors in the config raise :class:`ConfigError` (a ``ValueError``) naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bayes_susc.errors import ConfigError, MissingDependencyError
from bayes_susc.pipeline.spec import (
    EstimationSettings,
    ExecutionSettings,
    RunSpec,
    SamplingSettings,
    UntilConverged,
)
from bayes_susc.storage.draws import atomic_write, to_jsonable
from bayes_susc.target.components import Component

__all__ = [
    "ConfigError",
    "Prepared",
    "causal_lm_loss",
    "check_device",
    "load_run_config",
    "prepare",
    "run_from_config",
    "spec_from_config",
]


# ----------------------------------------------------------------------------- schema
# key -> (type name, default). Type names: str, int, float, bool, table, list[str],
# str|list[str], table|str. A default of _NO means "no default".
_NO = object()

_TOP = {
    "name": ("str", _NO),
    "out": ("str", _NO),
    "python_path": ("list[str]", []),
    "device": ("str", "cpu"),
    "model": ("table", _NO),
    "data": ("table", _NO),
    "components": ("table", {}),
    "sampling": ("table", {}),
    "estimate": ("table", {}),
    "run": ("table", {}),
    "until": ("table", _NO),
}
_MODEL = {
    "factory": ("str", _NO),
    "kwargs": ("table", {}),
    "kind": ("str", _NO),
    "config": ("table|str", _NO),
    "model_type": ("str", _NO),
    "attn_implementation": ("str", _NO),
    "checkpoint": ("str", _NO),
    "seed": ("int", 0),
}
_MODEL_KINDS = ("transformer_lens", "hf")
_CORPUS = {
    "seq_len": ("int", 64),
    "n_train": ("int", 256),
    "batch_size": ("int", 16),
    "n_eval": ("int", 16),
    "n_probe": ("int", 8),
    "seed": ("int", 0),
    "code_fraction": ("float", 0.5),
}
_DATA = {
    "factory": ("str", _NO),
    "kwargs": ("table", {}),
    "source": ("str", _NO),
    "loss": ("str", _NO),
    **_CORPUS,
}
# source name -> "module:function" building the data dict of that source
_DATA_SOURCES = {"stdlib_mixed": "bayes_susc.demo.corpus:stdlib_mixed_data"}
_FACTORY_DATA_KEYS = ("train_data", "eval_data", "probe_data", "probe_coords", "loss_fn")
_COMPONENTS = {
    "kind": ("str|list[str]", _NO),
    "regex": ("table", _NO),
    "include": ("list[str]", _NO),
    "shared_kv": ("str", "exclude"),
}
_SAMPLING = {
    "kernel": ("str", "sgld"),
    "step_size": ("float", 1e-3),
    "nbeta": ("float", 30.0),
    "gamma": ("float", 300.0),
    "num_chains": ("int", 4),
    "num_draws": ("int", 200),
    "num_burnin": ("int", 100),
    "steps_per_draw": ("int", 1),
    "seed": ("int", 0),
    "chain_method": ("str", "vectorized"),
}
_UNTIL = {
    "enabled": ("bool", True),
    "fraction": ("float", 0.99),
    "round_draws": ("int", 100),
    "max_draws": ("int", 2000),
    "time_budget": ("float", _NO),
}
_RUN = {
    "executor": ("str", "local"),
    "chains_per_job": ("int", _NO),
    "workers": ("int", _NO),
    "threads_per_worker": ("int", _NO),
    "address": ("str", _NO),
}
_ESTIMATE = {
    "method": ("str", "ess_t"),
    "confidence": ("float", 0.95),
    "min_ess": ("float", 100.0),
    "max_rhat": ("float", 1.01),
    "fdr": ("float", 0.05),
    "min_draws": ("int", 800),
    "n_resamples": ("int", 1000),
    "block_length": ("float", _NO),
    "seed": ("int", _NO),
}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "table":
        return isinstance(v, Mapping)
    if kind == "list[str]":
        return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
    if kind == "str|list[str]":
        return _type_ok("str", v) or _type_ok("list[str]", v)
    if kind == "table|str":
        return isinstance(v, (Mapping, str))
    raise AssertionError(kind)


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "table": "a table",
    "list[str]": "a list of strings",
    "str|list[str]": "a string or a list of strings",
    "table|str": "a table or a file path (string)",
}


def _check_table(where: str, table: Any, spec: Mapping, extra: tuple[str, ...] = ()) -> dict:
    """Unknown keys and wrong types of one table; returns it with defaults filled in."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {table!r} ({type(table).__name__})")
    allowed = sorted(set(spec) | set(extra))
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {where}; allowed keys: {allowed}"
        )
    out = {}
    for key, (kind, default) in spec.items():
        if key in table:
            v = table[key]
            if not _type_ok(kind, v):
                raise ConfigError(
                    f"{_key(where, key)} must be {_TYPE_WORDS[kind]}, got {v!r} "
                    f"({type(v).__name__})"
                )
            out[key] = float(v) if kind == "float" else v
        elif default is not _NO:
            out[key] = default
    for key in extra:
        if key in table:
            out[key] = table[key]
    return out


def _key(where: str, key: str) -> str:
    return f"{where[:-1]}.{key}]" if where.startswith("[") else f"{key!r}"


# ---------------------------------------------------------------------------- loading
def load_run_config(
    path_or_dict: str | Path | Mapping, overrides: Mapping | None = None
) -> tuple[dict, Path, str | None]:
    """Read a config: ``(config dict, base folder for relative paths, TOML text or None)``.

    ``overrides`` (same shape as the config) are merged into it table by table.
    """
    if isinstance(path_or_dict, Mapping):
        cfg, base, text = _deep_copy(path_or_dict), Path.cwd(), None
        cfg.setdefault("name", "run")
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        import tomllib

        text = path.read_text()
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        cfg.setdefault("name", path.stem)
        base = path.resolve().parent
    if overrides:
        cfg = _merge(cfg, overrides)
        text = None
    return cfg, base, text


def _deep_copy(d: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _merge(a: Mapping, b: Mapping) -> dict:
    out = _deep_copy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _deep_copy(v) if isinstance(v, Mapping) else v
    return out


def _validate(cfg: Mapping) -> dict:
    """Static checks of the whole config (keys, types, choices); defaults filled in."""
    top = _check_table("the config's top level", cfg, _TOP)
    for section in ("model", "data"):
        if section not in top:
            raise ConfigError(f"the config has no [{section}] table; it is required")
    model = _check_table("[model]", top["model"], _MODEL)
    if ("factory" in model) == ("kind" in model):
        raise ConfigError(
            "[model] needs exactly one of 'factory' (\"package.module:function\") or 'kind' "
            f"(one of {list(_MODEL_KINDS)}), got {'both' if 'factory' in model else 'neither'}"
        )
    if "factory" in model:
        _check_factory_spec("[model.factory]", model["factory"])
        bad = sorted({"config", "model_type", "attn_implementation"} & set(top["model"]))
        if bad:
            raise ConfigError(f"[model] keys {bad} apply only with 'kind', not with 'factory'")
    else:
        if model["kind"] not in _MODEL_KINDS:
            raise ConfigError(
                f"[model.kind] must be one of {list(_MODEL_KINDS)}, got {model['kind']!r}"
            )
        if "config" not in model:
            raise ConfigError(f"[model] with kind = {model['kind']!r} needs a 'config' table")
        if "kwargs" in top["model"]:
            raise ConfigError("[model.kwargs] applies only with 'factory'; use 'config'")
        if model["kind"] == "transformer_lens":
            bad = sorted({"model_type", "attn_implementation"} & set(top["model"]))
            if bad:
                raise ConfigError(f"[model] keys {bad} apply only with kind = 'hf'")
        else:
            model.setdefault("attn_implementation", "eager")
    data = _check_table("[data]", top["data"], _DATA)
    if ("factory" in data) == ("source" in data):
        raise ConfigError(
            "[data] needs exactly one of 'factory' (\"package.module:function\") or 'source' "
            f"(one of {list(_DATA_SOURCES)}), got {'both' if 'factory' in data else 'neither'}"
        )
    if "factory" in data:
        _check_factory_spec("[data.factory]", data["factory"])
        bad = sorted(set(_CORPUS) & set(top["data"]))
        if bad:
            raise ConfigError(f"[data] keys {bad} apply only with source = 'stdlib_mixed'")
        for k in _CORPUS:
            data.pop(k)
    else:
        if data["source"] not in _DATA_SOURCES:
            raise ConfigError(
                f"[data.source] must be one of {list(_DATA_SOURCES)}, got {data['source']!r}"
            )
        if "kwargs" in top["data"]:
            raise ConfigError("[data.kwargs] applies only with 'factory'")
        for k in ("seq_len", "n_train", "batch_size", "n_eval", "n_probe"):
            if data[k] < (2 if k == "seq_len" else 1):
                raise ConfigError(
                    f"[data.{k}] must be >= {2 if k == 'seq_len' else 1}, got {data[k]}"
                )
        if not 0.0 <= data["code_fraction"] <= 1.0:
            raise ConfigError(
                f"[data.code_fraction] must be in [0, 1], got {data['code_fraction']}"
            )
    if "loss" in data:
        _check_factory_spec("[data.loss]", data["loss"])
    comps = _check_table("[components]", top["components"], _COMPONENTS)
    if "kind" not in comps and "regex" not in comps:
        comps["kind"] = "heads"
    for name, pattern in comps.get("regex", {}).items():
        if not isinstance(pattern, str):
            raise ConfigError(
                f"[components.regex] maps names to patterns (strings); {name!r} = {pattern!r}"
            )
    if comps["shared_kv"] not in ("exclude", "include"):
        raise ConfigError(
            f"[components.shared_kv] must be 'exclude' or 'include', got {comps['shared_kv']!r}"
        )
    sampling = _check_table(
        "[sampling]", top["sampling"], _SAMPLING, extra=_kernel_keys(top["sampling"])
    )
    _check_sampling(sampling)
    estimate = _check_table("[estimate]", top["estimate"], _ESTIMATE)
    estimate.setdefault("seed", sampling["seed"])
    _check_estimate(estimate)
    run = _check_table("[run]", top["run"], _RUN)
    _check_run(run, sampling["num_chains"])
    if "until" in top:
        top["until"] = _check_table("[until]", top["until"], _UNTIL)
        _until_settings(top["until"], sampling["num_draws"])
    top.update(
        model=model, data=data, components=comps, sampling=sampling, estimate=estimate, run=run
    )
    return top


def _until_settings(u: Mapping[str, Any], num_draws: int) -> UntilConverged | None:
    """The ``[until]`` table as settings (``None`` when absent or disabled)."""
    if not u.get("enabled", False):
        return None
    try:
        until = UntilConverged(
            fraction=u["fraction"],
            round_draws=u["round_draws"],
            max_draws=u["max_draws"],
            time_budget=u.get("time_budget"),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[until] {exc}") from None
    if until.max_draws < num_draws:
        raise ConfigError(
            f"[until.max_draws] ({until.max_draws}) must be at least [sampling.num_draws] "
            f"({num_draws}), the first round's draws per chain"
        )
    return until


def _check_run(r: dict, num_chains: int) -> None:
    if r["executor"] not in ("local", "processes", "ray"):
        raise ConfigError(
            f"[run.executor] must be 'local', 'processes' or 'ray', got {r['executor']!r}"
        )
    if "address" in r and r["executor"] != "ray":
        raise ConfigError("[run.address] applies only with executor = 'ray'")
    for key in ("workers", "threads_per_worker"):
        if key in r and r["executor"] != "processes":
            raise ConfigError(f"[run.{key}] applies only with executor = 'processes'")
        if key in r and r[key] < 1:
            raise ConfigError(f"[run.{key}] must be >= 1, got {r[key]}")
    per = r.get("chains_per_job", num_chains)
    if per < 1 or num_chains % per:
        raise ConfigError(
            f"[run.chains_per_job] must be >= 1 and divide [sampling.num_chains] = "
            f"{num_chains}, got {per}"
        )
    if r["executor"] == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "[run.executor] = 'ray' needs Ray: pip install 'bayes_susc[ray]'"
            ) from None


def _check_factory_spec(where: str, spec: str) -> None:
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ConfigError(f'{where} must be "package.module:function", got {spec!r}')


def _kernel_keys(sampling: Any) -> tuple[str, ...]:
    """Hyperparameter names the chosen kernel takes (besides step_size)."""
    from bayes_susc.kernels.base import available_kernels, kernel_hyperparameter_names

    if not isinstance(sampling, Mapping):
        return ()
    name = sampling.get("kernel", "sgld")
    if not isinstance(name, str) or name not in available_kernels():
        raise ConfigError(
            f"[sampling.kernel] must be a registered kernel {available_kernels()}, got {name!r}"
        )
    names = set(kernel_hyperparameter_names(name))
    return tuple(sorted(names - set(_SAMPLING)))


def _check_sampling(s: dict) -> None:
    from bayes_susc.kernels.base import make_kernel

    for key in ("num_chains", "num_draws", "steps_per_draw"):
        if s[key] < 1:
            raise ConfigError(f"[sampling.{key}] must be >= 1, got {s[key]}")
    for key in ("num_burnin", "seed"):
        if s[key] < 0:
            raise ConfigError(f"[sampling.{key}] must be >= 0, got {s[key]}")
    if not s["nbeta"] > 0:
        raise ConfigError(f"[sampling.nbeta] must be > 0, got {s['nbeta']}")
    if not s["gamma"] >= 0:
        raise ConfigError(f"[sampling.gamma] must be >= 0, got {s['gamma']}")
    if s["chain_method"] not in ("vectorized", "sequential"):
        raise ConfigError(
            "[sampling.chain_method] must be 'vectorized' or 'sequential', got "
            f"{s['chain_method']!r}"
        )
    try:
        make_kernel(s["kernel"], **_kernel_kwargs(s))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[sampling] kernel {s['kernel']!r}: {exc}") from None


def _kernel_kwargs(s: Mapping) -> dict:
    driver = set(_SAMPLING) - {"step_size"}
    return {k: v for k, v in s.items() if k not in driver}


def _check_estimate(e: dict) -> None:
    from bayes_susc.estimation.response_matrix import check_thresholds
    from bayes_susc.estimation.susceptibility import validate_settings

    try:
        validate_settings(e["method"], e["confidence"], e["n_resamples"], e["seed"])
        check_thresholds(e["min_ess"], e["max_rhat"], e["fdr"], e["min_draws"])
        if "block_length" in e and not e["block_length"] > 0:
            raise ValueError(f"block_length must be > 0, got {e['block_length']}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[estimate] {exc}") from None


# ---------------------------------------------------------------------- construction
def causal_lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (nats), tokens (batch, pos) -> (batch, pos − 1).

    Works for models returning logits (this package's AttnOnlyTransformer, TransformerLens
    ``HookedTransformer``) and for Hugging Face models (output with ``.logits``); safe
    under ``torch.func`` transforms.
    """
    from bayes_susc.target.losses import loss_from_logits

    out = model(tokens)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return loss_from_logits(logits, tokens)


causal_lm_loss.broadcasts_replicas = True  # type: ignore[attr-defined]  # see next_token_loss


@contextlib.contextmanager
def _on_path(folders: list[Path]):
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(f)


def _resolve(where: str, spec: str) -> Callable:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{where}: cannot import module {mod_name!r} ({exc}); put its folder in "
            "'python_path' (relative to the config file) or install it"
        ) from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ConfigError(
                f"{where}: module {mod_name!r} has no attribute {attr!r}; it defines {public}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return fn


def _call(where: str, spec: str, fn: Callable, kwargs: Mapping) -> Any:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"{where} {spec} cannot be called with kwargs {dict(kwargs)}: {exc}"
        ) from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    return fn(**kwargs)


def _optional(module: str, names: tuple[str, ...], extra: str) -> tuple[Any, ...]:
    """Names from an optional dependency, or an error naming the extra that installs it."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"this config needs the optional package {module!r}, which is not installed; "
            f"install the extra: pip install 'bayes_susc[{extra}]' (in a checkout: "
            f"pip install -c constraints.txt -e '.[{extra}]')"
        ) from None
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        # TransformerLens 4.x dropped HookedTransformer: installed, but the wrong generation.
        version = getattr(mod, "__version__", "unknown")
        raise MissingDependencyError(
            f"this config needs {missing} from {module!r}, which the installed version "
            f"({version}) lacks; install the extra's pinned versions: pip install -c "
            f"constraints.txt -e '.[{extra}]'"
        )
    return tuple(getattr(mod, n) for n in names)


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless torch can use ``device`` here (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"'device' = {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA"
                if torch.version.cuda is None
                else "no GPU is visible"
            )
            raise ConfigError(f"'device' = {device!r} is not available: {why}; use device = 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"'device' = {device!r} is not available: {torch.cuda.device_count()} GPU(s) "
                "are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"'device' = {device!r} is not available on this machine; use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"'device' = {device!r}: only cpu, cuda and mps are supported")


def _path(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _build_model(m: Mapping, base: Path, device: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(m["seed"])
    if "factory" in m:
        fn = _resolve("[model.factory]", m["factory"])
        model = _call("[model.factory]", m["factory"], fn, m["kwargs"])
        desc = f"factory {m['factory']}"
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"[model.factory] {m['factory']} must return a torch.nn.Module, got "
                f"{type(model).__name__}"
            )
    else:
        conf = m["config"]
        if isinstance(conf, str):
            cpath = _path(base, conf)
            if not cpath.is_file():
                raise ConfigError(f"[model.config] file {str(cpath)!r} does not exist")
            conf = json.loads(cpath.read_text())
        conf = dict(conf)
        if m["kind"] == "transformer_lens":
            HookedTransformer, HookedTransformerConfig = _optional(
                "transformer_lens", ("HookedTransformer", "HookedTransformerConfig"), "models"
            )

            conf.setdefault("device", device)
            try:
                tl_cfg = HookedTransformerConfig(**conf)
            except (TypeError, ValueError, AssertionError) as exc:
                raise ConfigError(
                    f"[model.config] is not a HookedTransformerConfig: {exc}"
                ) from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                model = HookedTransformer(tl_cfg)
            desc = "TransformerLens HookedTransformer"
        else:
            AutoConfig, AutoModelForCausalLM = _optional(
                "transformers", ("AutoConfig", "AutoModelForCausalLM"), "models"
            )

            model_type = m.get("model_type", conf.pop("model_type", None))
            conf.pop("model_type", None)
            if model_type is None:
                raise ConfigError("[model] with kind = 'hf' needs 'model_type' (e.g. \"gpt2\")")
            try:
                hf_cfg = AutoConfig.for_model(model_type, **conf)
            except (TypeError, ValueError, KeyError) as exc:
                raise ConfigError(f"[model.config] for model_type {model_type!r}: {exc}") from None
            model = AutoModelForCausalLM.from_config(
                hf_cfg, attn_implementation=m["attn_implementation"]
            )
            desc = f"Hugging Face {type(model).__name__} ({model_type})"
    if "checkpoint" in m:
        _load_checkpoint(model, _path(base, m["checkpoint"]))
        desc += f", checkpoint {m['checkpoint']}"
    else:
        desc += f", random init (seed {m['seed']}), no checkpoint"
    return model.to(device).eval(), desc


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"[model.checkpoint] file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's message suggests weights_only=False, i.e. running the file's code.
            raise ConfigError(
                f"[model.checkpoint] {path} holds pickled Python objects, not just tensors; "
                "it is refused, because loading it could run arbitrary code. Save a state "
                "dict (torch.save(model.state_dict(), path)) or a .safetensors file"
            ) from None
        except Exception as exc:
            raise ConfigError(
                f"[model.checkpoint] {path} cannot be read as a state dict "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    if isinstance(state, Mapping) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ConfigError(
            f"[model.checkpoint] {path} must hold a state dict (name -> tensor), got "
            f"{type(state).__name__}"
        )
    result = model.load_state_dict(dict(state), strict=False)
    # Tied weights (GPT-2's lm_head = wte) may be stored once: a missing key is fine
    # when it shares storage with a loaded one.
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"[model.checkpoint] {path} does not fit the model: missing keys {missing[:10]}, "
            f"unexpected keys {list(result.unexpected_keys)[:10]}"
        )


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _build_data(d: Mapping, device: str) -> dict:
    if "factory" in d:
        fn = _resolve("[data.factory]", d["factory"])
        data = _call("[data.factory]", d["factory"], fn, d["kwargs"])
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"[data.factory] {d['factory']} must return a dict, got {type(data).__name__}"
            )
        missing = sorted({"train_data", "eval_data", "probe_data"} - set(data))
        unknown = sorted(set(data) - set(_FACTORY_DATA_KEYS))
        if missing or unknown:
            raise ConfigError(
                f"[data.factory] {d['factory']} must return keys train_data, eval_data, "
                f"probe_data (probe_coords, loss_fn optional); missing {missing}, "
                f"unknown {unknown}"
            )
        data = dict(data)
        if "loss_fn" in data and "loss" in d:
            raise ConfigError(
                "[data.loss] is given and the data factory returns a loss_fn; keep one"
            )
        if "loss_fn" in data and not callable(data["loss_fn"]):
            raise ConfigError("[data.factory] returned a loss_fn that is not callable")
    else:
        # A named built-in source, resolved like a user's factory so that the pipeline
        # imports no demo module.
        fn = _resolve("[data.source]", _DATA_SOURCES[d["source"]])
        data = fn(
            n_train=d["n_train"],
            n_eval=d["n_eval"],
            n_probe=d["n_probe"],
            seq_len=d["seq_len"],
            batch_size=d["batch_size"],
            seed=d["seed"],
            code_fraction=d["code_fraction"],
        )
    if "loss" in d:
        data["loss_fn"] = _resolve("[data.loss]", d["loss"])
    data.setdefault("loss_fn", causal_lm_loss)
    for key in ("train_data", "eval_data", "probe_data"):
        data[key] = _to(data[key], device)
    return data


def _components(model: torch.nn.Module, c: Mapping) -> list[Component]:
    from bayes_susc.target.architectures import by_regex, components

    out: list[Component] = []
    if "kind" in c:
        try:
            out += components(model, c["kind"], shared_kv=c["shared_kv"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[components.kind] = {c['kind']!r}: {exc}") from None
    for name, pattern in c.get("regex", {}).items():
        try:
            out.append(by_regex(name, model, pattern))
        except Exception as exc:
            raise ConfigError(f"[components.regex] {name} = {pattern!r}: {exc}") from None
    names = [comp.name for comp in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"[components] names {dup} occur more than once; rename the regex ones")
    bad = [n for n in names if not n or any(ch in n for ch in '/\\:*?"<>|') or n.startswith(".")]
    if bad:
        raise ConfigError(f"[components] names {bad} cannot be file names; rename them")
    if "include" in c:
        unknown = sorted(set(c["include"]) - set(names))
        if unknown:
            raise ConfigError(f"[components.include] names {unknown} are unknown; known: {names}")
        out = [comp for comp in out if comp.name in set(c["include"])]
    if not out:
        raise ConfigError("[components] selects no component")
    return out


# --------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """Everything a run needs, built and checked (nothing sampled yet)."""

    config: dict
    out: Path
    model: torch.nn.Module
    model_description: str
    data: dict
    components: list[Component]
    num_probe: int
    fingerprint: str
    toml_text: str | None = None
    info: dict = field(default_factory=dict)
    python_path: list[Path] = field(default_factory=list)  # resolved [python_path] folders


def prepare(
    path_or_dict: str | Path | Mapping,
    *,
    out: str | Path | None = None,
    overrides: Mapping | None = None,
) -> Prepared:
    """Validate a config and build its model, data and components; sample nothing.

    Raises:
        ConfigError: anything wrong with the config, its factories or checkpoint, or a
            model and data that do not fit together.
    """
    raw, base, text = load_run_config(path_or_dict, overrides)
    cfg = _validate(raw)
    out_dir = Path(out) if out is not None else Path(cfg.get("out", f"runs/{cfg['name']}"))
    device = cfg["device"]
    check_device(device)
    folders = [_path(base, p).resolve() for p in cfg["python_path"]]
    with _on_path(folders):
        model, desc = _build_model(cfg["model"], base, device)
        data = _build_data(cfg["data"], device)
    comps = _components(model, cfg["components"])
    for comp in comps:
        try:
            comp.resolve(model)
        except Exception as exc:
            raise ConfigError(f"[components] {comp.name} does not fit the model: {exc}") from None
    num_probe = _try_loss(model, data)
    coords = {k: list(v) for k, v in (data.get("probe_coords") or {}).items()}
    for name, values in coords.items():
        if len(values) != num_probe:
            raise ConfigError(
                f"probe_coords[{name!r}] has {len(values)} entries, but the loss gives "
                f"{num_probe} probe items"
            )
    coords.setdefault("dataset", ["probe"] * num_probe)  # the report colours by data set
    data["probe_coords"] = coords
    return Prepared(
        cfg,
        out_dir,
        model,
        desc,
        data,
        comps,
        num_probe,
        _fingerprint(model),
        text,
        python_path=folders,
    )


def _try_loss(model: torch.nn.Module, data: Mapping) -> int:
    from bayes_susc.target.posterior import as_batch_list

    loss_fn = data["loss_fn"]
    n = 0
    try:
        with torch.no_grad():
            for name in ("train_data", "eval_data", "probe_data"):
                batches = as_batch_list(name, data[name])
                for batch in batches if name == "probe_data" else batches[:1]:
                    loss = loss_fn(model, batch)
                    if not isinstance(loss, torch.Tensor):
                        raise TypeError(f"loss_fn returned {type(loss).__name__}, not a Tensor")
                    if not torch.isfinite(loss).all():
                        raise ValueError(f"loss_fn gave non-finite losses on {name}")
                    if name == "probe_data":
                        n += loss.numel()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the loss could not be evaluated at the anchor weights ({type(exc).__name__}: "
            f"{exc}); do model and data fit (vocabulary size, context length, batch format)?"
        ) from None
    if n == 0:
        raise ConfigError("probe_data holds no items")
    return n


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- run
def spec_from_config(p: Prepared) -> RunSpec:
    """The run spec of a prepared config (settings checked again as dataclasses)."""
    cfg = p.config
    s, e, r = cfg["sampling"], cfg["estimate"], cfg["run"]
    try:
        sampling = SamplingSettings(
            kernel=s["kernel"],
            hyperparameters=_kernel_kwargs(s),
            nbeta=s["nbeta"],
            gamma=s["gamma"],
            num_chains=s["num_chains"],
            num_draws=s["num_draws"],
            num_burnin=s["num_burnin"],
            steps_per_draw=s["steps_per_draw"],
            seed=s["seed"],
            chain_method=s["chain_method"],
            until=_until_settings(cfg.get("until", {}), s["num_draws"]),
        )
        estimation = EstimationSettings(
            method=e["method"],
            confidence=e["confidence"],
            min_ess=e["min_ess"],
            max_rhat=e["max_rhat"],
            fdr=e["fdr"],
            min_draws=e["min_draws"],
            n_resamples=e["n_resamples"],
            block_length=e.get("block_length"),
            seed=e["seed"],
        )
        execution = ExecutionSettings(
            executor=r["executor"],
            chains_per_job=r.get("chains_per_job"),
            workers=r.get("workers"),
            threads_per_worker=r.get("threads_per_worker"),
            address=r.get("address"),
            python_path=tuple(map(str, p.python_path)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    data = p.data
    return RunSpec(
        name=cfg["name"],
        model=p.model,
        model_description=p.model_description,
        loss_fn=data["loss_fn"],
        train_data=data["train_data"],
        eval_data=data["eval_data"],
        probe_data=data["probe_data"],
        probe_coords=data["probe_coords"],
        components=tuple(p.components),
        sampling=sampling,
        estimation=estimation,
        execution=execution,
        description=raw_config(cfg),
        settings_rows=_flat_settings(cfg, p.model_description),
    )


def run_from_config(
    path_or_dict: str | Path | Mapping,
    *,
    out: str | Path | None = None,
    progress: bool | None = None,
    overrides: Mapping | None = None,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the config's job; returns the summary (also ``summary.json``).

    Args:
        path_or_dict: a TOML file or the same content as a dict (see the module docs).
        out: run folder; default the config's ``out``, else ``runs/<name>``.
        progress: progress bars (``None``: only when stderr is a terminal).
        overrides: merged into the config table by table (e.g.
            ``{"sampling": {"num_draws": 20}}``).
        restart: discard the folder's results instead of refusing a folder started
            with another run (:func:`bayes_susc.pipeline.run.run`).
        log: called with a line per event worth telling (resumed components, ...).

    Raises:
        ConfigError: an invalid config (before any sampling).
        RunFolderError: the folder cannot be written, is in use, or was started with a
            different model, data, components or sampling settings (the message names
            what changed) and ``restart`` is False.
    """
    from bayes_susc.pipeline.run import check_output_folder, run, write_run_report

    raw, _, _ = load_run_config(path_or_dict, overrides)
    if out is None and isinstance(raw.get("out"), str):
        out = raw["out"]
    if out is not None:
        check_output_folder(Path(out))  # before building anything
    p = prepare(path_or_dict, out=out, overrides=overrides)
    spec = spec_from_config(p)
    check_output_folder(p.out)
    toml = p.toml_text if p.toml_text is not None else _to_toml(raw_config(p.config))
    summary = run(spec, p.out, progress=progress, restart=restart, report=False, log=log)
    atomic_write(p.out / "config.toml", lambda tmp: Path(tmp).write_text(toml))
    summary["config"] = raw_config(p.config)
    summary["model"]["fingerprint"] = p.fingerprint
    summary["report"] = str(p.out / "report.html")
    summary = to_jsonable(summary)
    atomic_write(
        p.out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    write_run_report(p.out, summary)
    return summary


def raw_config(cfg: Mapping) -> dict:
    """The validated config (defaults filled in) as plain TOML-able values."""
    return to_jsonable(dict(cfg))


def _flat_settings(cfg: Mapping, model_description: str) -> dict:
    """One row per setting for the report's settings table."""
    rows: dict[str, Any] = {"name": cfg["name"], "model": model_description}
    d = cfg["data"]
    rows["data"] = f"factory {d['factory']}" if "factory" in d else d["source"]
    for section in ("data", "components", "sampling", "until", "estimate"):
        for k, v in cfg.get(section, {}).items():
            if section == "data" and k in ("factory", "source"):
                continue
            rows[f"{section}.{k}"] = v if isinstance(v, (int, float, str)) else json.dumps(v)
    return rows


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
        )
    if v is None:
        raise ValueError("TOML has no null")
    return json.dumps(str(v))


def _to_toml(cfg: Mapping) -> str:
    """A config dict as TOML (scalars first, then one [table] per section)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, Mapping)]
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"]
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"
