"""Sweep files are checked in full before Ray starts: each bad key or value is one line naming it (dvp-sweep exits 2),
and a trial's overrides are exactly what dvp-train accepts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dvp.cli.sweep import main
from dvp.core.config import compose
from dvp.core.errors import ConfigError
from dvp.tune.spec import find_sweep, load_sweep

BASE = {
    "experiments": {"digits/dvp_vae": {"model.ctx_size": [2, 4]}, "digits/vampprior": {"model.num_pseudo": [5]}},
    "space": {"model.latent_scales": {"grid": [[1], [2, 2]]}, "train.lr": {"loguniform": [1e-3, 1e-2]}},
    "overrides": ["model.num_ch=8", "train.max_epochs=3"],
    "resources": {"workers": 2},
}


def sweep_file(tmp_path: Path, **changes: object) -> str:
    raw = {**BASE, **changes}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_every_shipped_sweep_loads() -> None:
    for path in sorted(Path(find_sweep("digits_depth_pseudo")).parent.glob("*.yaml")):
        spec = load_sweep(str(path))
        assert spec.arms and spec.max_epochs >= 1, path


def test_arms_cross_each_family_own_axes_and_overrides_compose(tmp_path: Path) -> None:
    spec = load_sweep(sweep_file(tmp_path), ["train.batch_size=32", "num_samples=3"])
    assert spec.arms == [{"experiment": "digits/dvp_vae", "model.ctx_size": 2},
                         {"experiment": "digits/dvp_vae", "model.ctx_size": 4},
                         {"experiment": "digits/vampprior", "model.num_pseudo": 5}]
    assert spec.num_samples == 3 and "train.batch_size=32" in spec.overrides
    assert load_sweep(sweep_file(tmp_path), ["model.num_ch=4"]).overrides == ["train.max_epochs=3", "model.num_ch=4"]
    config = {"arm": spec.arms[1], "space": {"model.latent_scales": [2, 2], "train.lr": 0.004}}
    cfg = compose(spec.trial_overrides(config))
    assert (cfg.model.name, cfg.model.ctx_size, list(cfg.model.latent_scales), cfg.train.lr, cfg.model.num_ch,
            cfg.train.batch_size) == ("dvp_vae", 4, [2, 2], 0.004, 8, 32)
    assert spec.reproduce_command(config).startswith("dvp-train experiment=digits/dvp_vae model.num_ch=8 ")
    assert "'model.latent_scales=[2,2]'" in spec.reproduce_command(config)


@pytest.mark.parametrize("changes, argv, message", [
    ({"schedulr": {"name": "asha"}}, [], "unknown sweep key 'schedulr'"),
    ({"num_samples": "two"}, [], "sweep key 'num_samples' expects int"),
    ({"resources": {"workers": "2"}}, [], "'resources.workers' expects an integer or [min, max]"),
    ({"resources": {"workers": [3, 1]}}, [], "resources.workers=[3, 1] needs 1 <= min <= max"),
    ({"experiments": {"digits/nope": {}}}, [], "experiment 'digits/nope' not found"),
    ({"experiments": {"digits/dvp_vae": {"model.ctx_size": 4}}}, [],
     "experiments.digits/dvp_vae.model.ctx_size must be a non-empty list"),
    ({"space": {"model.depth": {"grid": [1, 2]}}}, [], "unknown config key 'model.depth'"),
    ({"space": {"model.latent_scales": {"grid": ["deep"]}}}, [], "config key 'model.latent_scales' expects list"),
    ({"space": {"train.lr": {"uniform": [0.1]}}}, [], "space.train.lr.uniform takes 2 numbers"),
    ({"space": {"train.lr": {"between": [0, 1]}}}, [], "space.train.lr must be a value or one of"),
    ({"experiments": {"digits/dvp_vae": {"model.ctx_size": [2, 9]}}}, [], "model.ctx_size=9 must be in [1, 8]"),
    ({}, ["train.batch_size=63"], "does not split over 2 processes"),
    ({}, ["resources.workers=[1,3]", "train.batch_size=64"], "does not split over 3 processes"),
    ({"metric": "train/loss"}, [], "metric 'train/loss' must be a validation metric"),
    ({"scheduler": {"name": "asap"}}, [], "scheduler.name='asap'; choose one of asha"),
    ({"search": {"algorithm": "magic"}}, [], "search.algorithm='magic'; choose one of basic"),
    ({"overrides": ["run_dir=/x"]}, [], "override 'run_dir=/x' is set per trial"),
    ({"space": {"model.num_ch": {"grid": [8, 16]}}}, [], "'model.num_ch' is both a fixed override and a space axis"),
    ({}, ["ray.nodes=0"], "ray.nodes must be >= 1 and ray.wait_s > 0 (got 0 and 300)"),
])
def test_bad_sweep_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict,
                                         argv: list[str], message: str) -> None:
    path = sweep_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=None) as error:
        load_sweep(path, argv)
    assert message in str(error.value), str(error.value)
    assert main([f"sweep={path}", *argv]) == 2          # the command: exit 2, one line, before Ray starts
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_relative_storage_is_fixed_where_the_sweep_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials run in Ray actors with other working folders (on a cluster, the head's home): the sweep folder is
    made absolute when the sweep is loaded, not where a trial asks for it."""
    path = sweep_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(path, ["storage=runs/sweeps"])
    monkeypatch.chdir("/")
    assert spec.sweep_dir == str(tmp_path.resolve() / "runs/sweeps/s")
    assert str(spec.runs_dir()).startswith(str(tmp_path))


def test_missing_sweep_names_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep=no_such_sweep"]) == 2
    err = capsys.readouterr().err
    assert "sweep 'no_such_sweep' not found" in err and "digits_depth_pseudo" in err
    assert main([]) == 2 and "give the sweep once: sweep=NAME" in capsys.readouterr().err


def test_the_script_ray_submit_ships_runs_dvp_sweep() -> None:
    import subprocess
    import sys
    script = Path(find_sweep("digits_depth_pseudo")).parent / "sweep.py"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "dvp-sweep sweep=NAME" in res.stdout
    res = subprocess.run([sys.executable, str(script), "sweep=digits_depth_pseudo", "num_samples=0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().endswith("num_samples=0 must be >= 1"), res.stderr
