"""Kill -9 anywhere, budget stops and SIGTERM/Ctrl-C: a resumed run ends as an uninterrupted one, with the same
weights (bitwise), best checkpoint, patience counter and metrics records; a signal ends any command in seconds.

Every run here is a real `dvp-train` process on the bundled digits (20 steps per epoch at batch 64); the kills
are real SIGKILLs at chosen points (tests/helpers/kill_points.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dvp.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
RUN = ["train.batch_size=64", "train.max_epochs=2", "train.ckpt_every=5", "train.log_every=5",
       "wandb.mode=disabled", "eval.is_samples=4", "eval.is_chunk=4", "eval.max_images=20", "model.num_ch=16",
       "model.enc_blocks_per_scale=1", "model.diffusion.num_res_blocks=1"]   # the smallest model of every code path
TIMING = {"time", "images_per_s", "sample_seconds_per_image", "checkpoint"}


def _train(run_dir: Path, *extra: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """`dvp-train` in a subprocess (through tests/helpers/kill_points.py when `kill` is given)."""
    args = [*RUN, f"run_dir={run_dir}", *extra]
    cmd = ([sys.executable, str(HERE / "helpers" / "kill_points.py"), kill[0], str(kill[1]), *args] if kill
           else [sys.executable, "-m", "dvp.train", *args])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir.parent, timeout=600)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal weights, EMA, optimizer state and loop state; the same records and test results."""
    for name in ("last.pt", "best.pt"):
        sa, sb = load_checkpoint(a / "checkpoints" / name), load_checkpoint(b / "checkpoints" / name)
        for key in ("model", "ema"):
            assert sa["engine"][key].keys() == sb["engine"][key].keys()
            assert all(torch.equal(sa["engine"][key][k], sb["engine"][key][k]) for k in sa["engine"][key]), name
        moments_a, moments_b = sa["engine"]["optimizer"]["tensors"], sb["engine"]["optimizer"]["tensors"]
        assert all(torch.equal(moments_a[n][k], moments_b[n][k]) for n in moments_a for k in moments_a[n]), name
        assert sa["engine"]["optimizer"]["step"] == sb["engine"]["optimizer"]["step"], name
        assert sa["engine"]["counters"] == sb["engine"]["counters"], name
        assert sa["loop"] == sb["loop"] and sa["batches"] == sb["batches"], name
    assert _records(a) == _records(b)
    results = [{k: v for k, v in json.loads((d / "checkpoints" / "best.eval.json").read_text()).items()
                if k not in TIMING} for d in (a, b)]
    assert results[0] == results[1]
    assert not list((b / "checkpoints").glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: 2 epochs (40 steps), checkpoints every 5 steps, the final evaluation."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = _train(run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    records = _records(run_dir)
    assert [r["step"] for r in records if r["split"] == "val"] == [20, 40]
    assert [r["split"] for r in records].count("test") == 1
    return run_dir


@pytest.mark.parametrize("point,n", [
    ("step", 7),            # mid-step, mid-epoch 0: after the backward, before the update
    ("save", 3),            # half-written last.pt at step 15: the previous one stays, the temp file is removed
    ("after_val", 1),       # the epoch-0 validation record is written, best.pt and last.pt are not
    ("after_best", 2),      # best.pt of epoch 1 is written, last.pt is not
    ("final_eval", 1),      # in the IS-NLL of the final evaluation
], ids=["mid-step", "mid-save", "between-val-record-and-checkpoint", "between-best-and-last", "final-eval"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(reference: Path, tmp_path: Path, point: str,
                                                          n: int) -> None:
    run_dir = tmp_path / "run"
    killed = _train(run_dir, kill=(point, n))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if point == "save":
        assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp"))        # the kill left a temp file
    resumed = _train(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout
    _assert_same_run(reference, run_dir)


def test_sigterm_during_validation_saves_the_state_before_the_epoch_end(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stopped = _train(run_dir, kill=("term_val", 2))                  # a real SIGTERM inside the epoch-1 validation
    assert stopped.returncode == 0, stopped.stderr[-3000:]                # saved: a preemption, not a failure
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM during validation")
    assert "Traceback" not in stopped.stderr
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["loop"]["step"] == 40 and saved["loop"]["epoch"] == 1          # before the epoch end
    assert [r["step"] for r in _records(run_dir) if r["split"] == "val"] == [20]
    resumed = _train(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, run_dir)


def test_budget_stop_mid_epoch_is_a_pause_not_an_epoch_end(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _train(run_dir, "train.max_steps=30", "train.final_eval=false")       # stops mid-epoch 1
    assert first.returncode == 0, first.stderr[-3000:]
    assert "max_steps=30 reached" in first.stdout
    paused = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert paused["loop"]["step"] == 30 and paused["loop"]["epoch"] == 1
    assert [r["step"] for r in _records(run_dir) if r["split"] == "val"] == [20]    # no validation at step 30
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["loop"]["step"] == 20
    second = _train(run_dir, "train.max_steps=null", "train.final_eval=true")    # the saved config keeps
    assert second.returncode == 0, second.stderr[-3000:]                             # max_steps=30 otherwise
    _assert_same_run(reference, run_dir)


def test_a_stop_before_any_validation_skips_the_final_eval_with_a_reason(tmp_path: Path) -> None:
    res = _train(tmp_path / "run", "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no final evaluation" in res.stdout and "before its first epoch ended" in res.stdout


def _start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    err = cwd / "stderr.txt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err.open("w"), cwd=cwd)
    return proc, err


def _signal_when(proc: subprocess.Popen, err: Path, marker: str, signum: int, timeout: float = 120) -> float:
    """Send `signum` once `marker` appears on the process's stderr; returns the seconds until it exited."""
    deadline = time.monotonic() + timeout
    while marker not in err.read_text():
        assert proc.poll() is None, f"exited before '{marker}': {err.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no '{marker}' within {timeout} s"
        time.sleep(0.05)
    proc.send_signal(signum)
    start = time.monotonic()
    proc.wait(timeout=60)
    return time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT],
                         ids=["SIGTERM", "SIGUSR1", "Ctrl-C"])
def test_a_signal_in_training_saves_and_the_resumed_run_equals_the_uninterrupted_one(
        reference: Path, tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    proc, err = _start([sys.executable, "-m", "dvp.train", *RUN, f"run_dir={run_dir}"], tmp_path)
    seconds = _signal_when(proc, err, "step 5/", signum)
    saved_exit = 128 + signum if signum == signal.SIGINT else 0    # SIGTERM/SIGUSR1 (preemption): saved, exit 0
    assert proc.returncode == saved_exit and seconds < 10, err.read_text()[-2000:]
    last_line = err.read_text().strip().splitlines()[-1]
    assert last_line.startswith(f"stopped: {signal.Signals(signum).name}") and "resume with" in last_line
    assert "Traceback" not in err.read_text()
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["loop"]["step"]
    assert 5 <= step < 40
    resumed = _train(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, run_dir)


def test_sigterm_in_the_final_evaluation_ends_in_seconds(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = [a for a in RUN if not a.startswith("eval.")]
    proc, err = _start([sys.executable, "-m", "dvp.train", *run, "train.max_steps=20", "eval.is_samples=1000",
                        "eval.is_chunk=100", f"run_dir={run_dir}"], tmp_path)
    seconds = _signal_when(proc, err, "IS-NLL: ", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM and seconds < 10, err.read_text()[-2000:]
    assert "during the final evaluation" in err.read_text() and "Traceback" not in err.read_text()
    assert not (run_dir / "checkpoints" / "best.eval.json").exists()
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["loop"]["step"] == 20


def test_sigterm_ends_dvp_eval_and_dvp_sample_in_seconds(reference: Path, tmp_path: Path) -> None:
    proc, err = _start([sys.executable, "-m", "dvp.evaluate", f"run_dir={reference}", "eval.is_samples=1000",
                        "eval.is_chunk=100", f"out={tmp_path / 'r.json'}"], tmp_path)
    seconds = _signal_when(proc, err, "IS-NLL: ", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM and seconds < 10, err.read_text()[-2000:]
    assert err.read_text().strip().splitlines()[-1].startswith("stopped: interrupted by SIGTERM")
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob(".*tmp*"))
    proc, err = _start([sys.executable, "-m", "dvp.sample", f"run_dir={reference}", "n=2000",
                        f"out={tmp_path / 's.png'}"], tmp_path)
    seconds = _signal_when(proc, err, "sampling 2000 images", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM and seconds < 10, err.read_text()[-2000:]
    assert err.read_text().strip().splitlines()[-1].startswith("stopped: interrupted by SIGTERM")
    assert not (tmp_path / "s.png").exists() and not list(tmp_path.glob(".*tmp*"))
