"""dvp-report's bad inputs (exit 2, one `error:` line naming the folder or key, nothing written) and the pieces of
the report that need no sweep run: validation records, which trials `eval=true` evaluates and how. The report on a
real sweep folder is checked by the sweep integration test."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dvp.cli.report import OPTIONS, main
from dvp.tune.report import eval_command, to_evaluate
from dvp.tune.spec import find_sweep
from dvp.tune.trials import validations


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run dvp-report on argv; check exit 2 and a single error line on stderr, and return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, [str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in line and "does not exist" in line and "dvp-sweep printed" in line
    assert not (tmp_path / "nope").exists()


def test_folder_without_sweep_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, [str(tmp_path)])
    assert str(tmp_path) in line and "sweep.yaml" in line and "dvp-sweep printed" in line
    assert list(tmp_path.iterdir()) == []


def test_sweep_folder_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(find_sweep("digits_depth_pseudo"), tmp_path / "sweep.yaml")
    line = _error(capsys, [str(tmp_path)])
    assert "experiment_state" in line and "dvp-sweep" in line
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]


@pytest.mark.parametrize("args, fragment", [
    (["colour=red"], "unknown key 'colour'; allowed: " + ", ".join(OPTIONS)),
    (["eval.is_chunk=4", "eval=true"], "unknown key 'eval.is_chunk'"),
    (["eval=yes"], "eval=yes; give eval=true or eval=false"),
    (["wandb=yes"], "wandb=yes; give wandb=true or wandb=false"),
    (["eval=true", "workers=0"], "workers=0 must be >= 1"),
    (["eval=true", "eval.is_samples=many"], "eval.is_samples=many is not an integer"),
    (["eval.max_images=10"], "eval.max_images= applies to the test evaluation only; add eval=true"),
    (["out=a", "out=b"], "key 'out' is given twice"),
])
def test_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> None:
    assert fragment in _error(capsys, [str(tmp_path), *args])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [[], ["eval=true"], ["a", "b"]])
def test_sweep_folder_given_once(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert "give the sweep folder once: dvp-report SWEEP_DIR" in _error(capsys, argv)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "dvp-report SWEEP_DIR" in capsys.readouterr().out


def _run_dir(root: Path, name: str, stop: bool, best: bool, evaluated: bool) -> Path:
    run = root / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    for present, path in ((stop, run / "stop.json"), (best, run / "checkpoints" / "best.pt"),
                          (evaluated, run / "checkpoints" / "best.eval.json")):
        if present:
            path.write_text("{}")
    return run


def test_eval_takes_the_finished_trials_not_yet_evaluated(tmp_path: Path) -> None:
    done = _run_dir(tmp_path, "t_00000", stop=True, best=True, evaluated=False)
    _run_dir(tmp_path, "t_00001", stop=False, best=True, evaluated=False)     # stopped by the scheduler / running
    _run_dir(tmp_path, "t_00002", stop=True, best=True, evaluated=True)       # evaluated already
    _run_dir(tmp_path, "t_00003", stop=True, best=False, evaluated=False)     # no validation improved
    assert to_evaluate(tmp_path) == [done]


def test_eval_command_shards_over_workers(tmp_path: Path) -> None:
    assert eval_command(tmp_path, 1000, None, 1) == [sys.executable, "-m", "dvp.evaluate", f"run_dir={tmp_path}",
                                                     "eval.is_samples=1000"]
    command = eval_command(tmp_path, 50, 100, 4)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert command[-5:] == ["-m", "dvp.evaluate", f"run_dir={tmp_path}", "eval.is_samples=50", "eval.max_images=100"]


def test_validations_one_per_epoch_in_order(tmp_path: Path) -> None:
    records = [{"split": "train", "step": 5, "loss": 1.0, "time": 1.0},
               {"split": "val", "step": 20, "epoch": 1, "nelbo": 30.0, "time": 3.0},
               {"split": "val", "step": 10, "epoch": 0, "nelbo": 40.0, "time": 2.0},
               {"split": "val", "step": 20, "epoch": 1, "nelbo": 29.0, "time": 4.0}]       # epoch 1 redone
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut sh')
    assert [(r["epoch"], r["nelbo"]) for r in validations(tmp_path)] == [(0, 40.0), (1, 29.0)]
    assert validations(tmp_path / "missing") == []
