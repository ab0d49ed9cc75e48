"""Configuration: composition, overrides and validation before any compute; the dvp-info command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dvp.core.config import experiments, to_dict
from dvp.core.errors import ConfigError
from dvp.train.config import compose, from_dict


def test_defaults_compose_and_experiments_merge_on_top() -> None:
    cfg = compose([])
    assert cfg.data.name == "digits" and cfg.model.name == "dvp_vae" and cfg.experiment is None
    mnist = compose(["experiment=mnist/dvp_vae", "train.lr=5e-3", "model.latent_scales=[2,3]"])
    assert mnist.experiment == "mnist/dvp_vae" and mnist.train.batch_size == 250
    assert mnist.train.lr == 5e-3 and list(mnist.model.latent_scales) == [2, 3]
    assert {"mnist/dvp_vae", "mnist/ladder", "mnist/vampprior", "omniglot/dvp_vae", "cifar10/dvp_vae",
            "digits/dvp_vae"} <= set(experiments())


def test_saved_config_round_trips_as_a_plain_dict() -> None:
    cfg = compose(["experiment=mnist/ladder"])
    d = to_dict(cfg)
    assert isinstance(d, dict) and isinstance(d["model"], dict)
    assert to_dict(from_dict(d)) == d


@pytest.mark.parametrize("overrides,fragment", [
    (["train.lrr=1"], "train.lrr"),
    (["nonsense=1"], "nonsense"),
    (["train.lr=fast"], "train.lr"),
    (["train.batch_size=2.5"], "train.batch_size"),
    (["model.latent_scales=[a]"], "model.latent_scales"),
    (["model.name=vae"], "model.name"),
    (["data.name=imagenet"], "data.name"),
    (["train.precision=fp8"], "train.precision"),
    (["experiment=mnist/nope"], "mnist/dvp_vae"),
    (["experiment=mnist/dvp_vae", "model.ctx_size=29"], "model.ctx_size"),
    (["experiment=cifar10/dvp_vae", "model.latent_width=4"], "model.latent_width"),
    (["experiment=mnist/dvp_vae", "model.latent_scales=[1,1,1]"], "model.latent_scales"),
    (["model.likelihood=logistic_mixture"], "data.binarize"),
    (["train.lr=-1"], "train.lr"),
    (["dist.zero_stage=4"], "dist.zero_stage"),
    (["train.lr"], "key=value"),
])
def test_bad_configs_fail_with_a_message_naming_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        compose(overrides)


def test_dvp_info_prints_resolved_config_and_params_last() -> None:
    out = subprocess.run([sys.executable, "-m", "dvp.info", "experiment=mnist/dvp_vae"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "params: 648515"
    assert "ctx_size: 7" in out and any(line.strip().startswith("prior_u: 47,329") for line in lines)


def test_cli_bad_key_exits_2_with_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "dvp.info", "train.lrr=1"], capture_output=True, text=True)
    assert res.returncode == 2 and "train.lrr" in res.stderr and "Traceback" not in res.stderr


def test_every_numeric_key_has_a_range_and_every_nullable_key_a_type() -> None:
    from omegaconf import OmegaConf

    from dvp.core.config import CONFIG_DIR, SCHEMA
    defaults = dict(SCHEMA.leaves(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "defaults.yaml"))))
    keys = SCHEMA.keys
    numeric = {k for k, s in keys.items() if s.type in (int, float)}
    ranges = {k for k, s in keys.items() if s.range is not None}
    assert numeric - {k for k, s in keys.items() if s.choices} <= ranges, numeric - ranges
    assert set(keys) == set(defaults) and {k for k, s in keys.items() if s.nullable} == {
        k for k, v in defaults.items() if v is None}
    assert all(keys[k].type in (int, float, str, bool) for k, v in defaults.items() if v is None)
    assert all(s.comment for s in keys.values())


def test_a_numeric_key_without_a_range_is_an_error_of_the_schema_file(tmp_path) -> None:
    from dvp.core.schema import load_schema
    (tmp_path / "defaults.yaml").write_text("a:\n  lr: 0.1   # learning rate\n")
    with pytest.raises(ValueError, match="numeric key 'a.lr' declares no range"):
        load_schema(tmp_path / "defaults.yaml", "config key")
    (tmp_path / "defaults.yaml").write_text("a:\n  lr: 0.1   # {> 0} learning rate\n  b: null\n")
    with pytest.raises(ValueError, match="key 'a.b' has no comment"):
        load_schema(tmp_path / "defaults.yaml", "config key")


@pytest.mark.parametrize("key,bad,good", [
    ("train.lr", "0", "1e-4"), ("train.log_every", "0", "1"), ("train.lr_epochs", "0", "1"),
    ("train.ema", "1", "0.5"), ("eval.max_images", "0", "1"), ("train.num_threads", "0", "1"),
    ("model.diffusion.dropout", "1", "0.5"), ("train.max_minutes", "-1", "0"),
])
def test_range_edges(key: str, bad: str, good: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([f"{key}={bad}"])
    compose([f"{key}={good}"])
