"""`bayes-susc run CONFIG.toml`: config validation, model/data construction, runs, resume."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import xarray as xr
from tl_compat import hooked_transformer_lens

from bayes_susc.errors import RunFolderError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bayes_susc.pipeline.config import (  # noqa: E402
    ConfigError,
    causal_lm_loss,
    prepare,
    run_from_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {
    "sampling": {"num_chains": 2, "num_draws": 8, "num_burnin": 2},
    "data": {"n_train": 16, "seq_len": 12, "n_probe": 2, "n_eval": 4, "batch_size": 8},
    "estimate": {"n_resamples": 50},
}
TL_CONFIG = {
    "n_layers": 1,
    "d_model": 16,
    "n_heads": 2,
    "d_head": 8,
    "n_ctx": 16,
    "d_vocab": 256,
    "act_fn": "relu",
    "attn_only": True,
}


def test_tiny_gpt2_example_runs_and_resumes(tmp_path):
    out = tmp_path / "run"
    summary = run_from_config(EXAMPLES / "tiny_gpt2.toml", out=out, progress=False, overrides=TINY)
    names = ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert sorted(p.stem for p in (out / "components").glob("*.nc")) == names
    with xr.open_dataset(out / "response_matrix.nc") as m:
        assert m["chi"].transpose("probe", "component").shape == (2 * 11, 4)
        assert [str(c) for c in m["component"].values] == names
    for f in ("report.html", "summary.json", "config.toml", "run_info.json"):
        assert (out / f).is_file()
    assert "Response matrix" in (out / "report.html").read_text()
    assert summary["computed_this_run"] == names
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "components").glob("*.nc")}
    again = run_from_config(EXAMPLES / "tiny_gpt2.toml", out=out, progress=False, overrides=TINY)
    assert again["computed_this_run"] == []
    assert {p: p.stat().st_mtime_ns for p in (out / "components").glob("*.nc")} == mtimes
    # A resumed folder refuses different sampling settings.
    changed = {**TINY, "sampling": {**TINY["sampling"], "num_draws": 9}}
    with pytest.raises(RunFolderError, match=r"changed: sampling num_draws: 8 -> 9"):
        run_from_config(EXAMPLES / "tiny_gpt2.toml", out=out, progress=False, overrides=changed)


def _tl_model():
    tl = hooked_transformer_lens()  # skips under TransformerLens 4.x
    HookedTransformer, HookedTransformerConfig = tl.HookedTransformer, tl.HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(123)
        return HookedTransformer(HookedTransformerConfig(**TL_CONFIG, device="cpu"))


def test_transformer_lens_checkpoint_loads_weights_only(tmp_path):
    model = _tl_model()
    ckpt = tmp_path / "tl.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = {
        "model": {"kind": "transformer_lens", "config": TL_CONFIG, "checkpoint": str(ckpt)},
        "data": {"source": "stdlib_mixed", **TINY["data"]},
        "sampling": TINY["sampling"],
        "estimate": TINY["estimate"],
    }
    p = prepare(cfg, out=tmp_path / "run")
    loaded = dict(p.model.named_parameters())
    for name, w in model.named_parameters():
        torch.testing.assert_close(loaded[name], w, rtol=0, atol=0)
    assert [c.name for c in p.components] == ["L0H0", "L0H1"]
    # A single component runs end to end (short tables-only report).
    one = {**cfg, "components": {"include": ["L0H1"]}}
    summary = run_from_config(one, out=tmp_path / "run", progress=False)
    assert list(summary["components"]) == ["L0H1"]
    assert (tmp_path / "run" / "report.html").is_file()


def test_checkpoint_safetensors_and_pickle_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = _tl_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "tl.safetensors")
    cfg = {
        "model": {"kind": "transformer_lens", "config": TL_CONFIG, "checkpoint": "tl.safetensors"},
        "data": {"source": "stdlib_mixed", **TINY["data"]},
    }
    monkeypatch.chdir(tmp_path)  # relative paths of a dict config: the working directory
    p = prepare(cfg)
    w = dict(p.model.named_parameters())["blocks.0.attn.W_Q"]
    torch.testing.assert_close(w, model.blocks[0].attn.W_Q)
    torch.save({"weights": model.state_dict(), "extra": object()}, tmp_path / "pickle.pt")
    bad = {**cfg, "model": {**cfg["model"], "checkpoint": "pickle.pt"}}
    with pytest.raises(ConfigError, match="pickled Python objects") as refused:
        prepare(bad)
    # torch's own hint (load with weights_only=False, i.e. run the file's code) is not passed on
    assert "weights_only=False" not in str(refused.value)


def test_custom_factory_example(tmp_path):
    summary = run_from_config(
        EXAMPLES / "custom_factory.toml",
        out=tmp_path / "run",
        progress=False,
        overrides={
            "sampling": {"num_chains": 2, "num_draws": 10, "num_burnin": 2},
            "estimate": {"n_resamples": 50},
        },
    )
    assert list(summary["components"]) == ["hidden", "readout"]
    assert summary["response_matrix"]["shape"] == [24, 2]
    assert (tmp_path / "run" / "report.html").is_file()


def test_causal_lm_loss_handles_logits_and_hf_outputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=256, n_positions=16))
    tokens = torch.randint(0, 256, (2, 8))
    loss = causal_lm_loss(hf, tokens)
    assert loss.shape == (2, 7)
    tl = _tl_model()
    assert causal_lm_loss(tl, tokens).shape == (2, 7)


def _base(**sections):
    cfg = {
        "model": {"factory": "my_factories:make_model", "kwargs": {"train_steps": 0}},
        "data": {"factory": "my_factories:make_data"},
        "components": {"regex": {"hidden": r"^0\."}},
        "python_path": [str(EXAMPLES)],
    }
    for k, v in sections.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"bogus": 1}, r"unknown key 'bogus' in the config's top level; allowed keys: \["),
        ({"sampling": {"num_drawz": 3}}, r"unknown key 'num_drawz' in \[sampling\].*num_draws"),
        ({"model": {"factory": "a:b", "colour": 1}}, r"'colour' in \[model\]"),
        ({"estimate": {"alpha": 0.1}}, r"'alpha' in \[estimate\]"),
        ({"model": None}, r"no \[model\] table"),
        ({"sampling": {"num_draws": "200"}}, r"\[sampling.num_draws\] must be an integer"),
        ({"sampling": {"step_size": True}}, r"\[sampling.step_size\] must be a number"),
        ({"sampling": {"num_chains": 0}}, r"\[sampling.num_chains\] must be >= 1"),
        ({"sampling": {"kernel": "nuts"}}, r"registered kernel"),
        ({"sampling": {"step_size": -1.0}}, r"\[sampling\] kernel 'sgld'.*step_size"),
        ({"estimate": {"max_rhat": 0.9}}, r"\[estimate\] max_rhat"),
        ({"estimate": {"method": "magic"}}, r"\[estimate\] method"),
        ({"components": {"kind": "heads", "include": 3}}, r"include\] must be a list"),
        ({"model": {"factory": "nope"}}, r"package.module:function"),
        ({"model": {"factory": "a:b", "kind": "hf"}}, r"exactly one of 'factory'"),
        ({"model": {"kind": "keras", "config": {}}}, r"\[model.kind\] must be one of"),
        ({"model": {"kind": "hf"}}, r"needs a 'config' table"),
        ({"data": {"source": "wiki"}}, r"\[data.source\] must be one of"),
        ({"data": {"factory": "a:b", "seq_len": 3}}, r"apply only with source"),
        ({"model": {"factory": "no_such_module_xyz:f"}}, r"cannot import module 'no_such_module"),
        ({"model": {"factory": "my_factories:missing"}}, r"has no attribute 'missing'"),
        ({"model": {"factory": "my_factories:loss_fn"}}, r"\[model.factory\]"),
        (
            {"model": {"factory": "my_factories:make_model", "checkpoint": "/no/such.pt"}},
            r"checkpoint\] file '/no/such.pt' does not exist",
        ),
        ({"components": {"include": ["nope"], "regex": {"a": "^0"}}}, r"unknown; known"),
        ({"components": {"regex": {"a": "^zzz"}}}, r"\[components.regex\] a"),
        ({"components": {"kind": "heads"}}, r"\[components.kind\]"),
        ({"data": {"source": "stdlib_mixed"}}, r"loss could not be evaluated"),
    ],
)
def test_validation_errors(sections, match):
    with pytest.raises(ConfigError, match=match):
        prepare(_base(**sections))


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nfactory = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        prepare(bad)


def test_cli_run_and_config_error(tmp_path):
    from typer.testing import CliRunner

    from bayes_susc.cli import app

    cfg = tmp_path / "c.toml"
    text = (EXAMPLES / "custom_factory.toml").read_text()
    text = text.replace('python_path = ["."]', f"python_path = [{str(EXAMPLES)!r}]")
    text = text.replace("num_draws = 200", "num_draws = 6").replace("num_burnin = 100", "")
    text = text.replace("num_chains = 4", "num_chains = 2")
    cfg.write_text(text)
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "hidden" in res.output
    cfg.write_text(text + "\n[extra]\n")
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2
    assert "unknown key 'extra'" in res.output


def test_optional_dependency_of_the_wrong_generation_names_what_is_missing():
    """An installed package without the names a config needs (TransformerLens 4.x has no
    HookedTransformer) is reported like a missing extra, not as a raw ImportError."""
    from bayes_susc.errors import MissingDependencyError
    from bayes_susc.pipeline import config

    assert config._optional("json", ("dumps",), "models")[0] is json.dumps
    with pytest.raises(MissingDependencyError, match=r"\['HookedTransformer'\] from 'json'"):
        config._optional("json", ("dumps", "HookedTransformer"), "models")
