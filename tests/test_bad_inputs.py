"""Every bad input to the console commands: exit 2, one `error:` line naming the key, file or value, no traceback,
nothing written (no new run dir, the existing run and input files byte for byte as before).

Cases run in-process (`dvp.<command>.main(argv)`, milliseconds each) except SUBPROCESS ones, which run as
`python -m dvp.<command>` to cover the real entry point. In a case's argv and fragment, `<name>` stands for a path
of `Paths` (e.g. `<run>` for the trained run dir, `<new>` for a fresh run dir in the test's working directory).
"""
from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dvp.cli.eval
import dvp.cli.info
import dvp.cli.sample
import dvp.cli.train
from dvp.train.checkpoint import save_checkpoint

RUN_ARGS = ["train.max_steps=20", "train.batch_size=64", "wandb.mode=disabled", "eval.is_samples=4",
            "eval.is_chunk=4", "eval.max_images=20"]
MAINS: dict[str, Callable[[list[str]], int]] = {"train": dvp.cli.train.main, "eval": dvp.cli.eval.main,
                                                "sample": dvp.cli.sample.main, "info": dvp.cli.info.main}
MODULES = {"train": "dvp.train", "eval": "dvp.evaluate", "sample": "dvp.sample", "info": "dvp.info"}
FORBIDDEN = ("Traceback", "could run code", "refused", "pickle")
"""Never printed for these inputs: none is a pickle or a file that would run code."""


@dataclass(frozen=True)
class Paths:
    """What the cases point at: a trained run and input files (module-wide, never to change), and the test's
    working directory `cwd` (must stay empty: no `runs/`, no `new/`)."""
    root: Path        # holds run/ and inputs/, snapshot before and after every case
    cwd: Path

    def mapping(self) -> dict[str, Path]:
        inputs = self.root / "inputs"
        return {"run": self.root / "run", "last": self.root / "run" / "checkpoints" / "last.pt",
                "text": inputs / "notes.txt", "empty": inputs / "empty.bin", "random": inputs / "random.bin",
                "noise80": inputs / "noise80.bin", "fifo": inputs / "fifo", "truncated": inputs / "truncated.pt",
                "mismatch": inputs / "mismatch.pt", "folder": inputs / "folder",
                "new": self.cwd / "new", "missing": self.cwd / "missing", "unwritable": Path("/proc/dvp-test/run")}

    def fill(self, text: str) -> str:
        for name, path in self.mapping().items():
            text = text.replace(f"<{name}>", str(path))
        return text


@dataclass(frozen=True)
class Case:
    id: str
    command: str          # train | eval | sample | info
    argv: tuple[str, ...]
    fragment: str         # must appear (case-sensitive) in the error line, after filling in the paths


def case(id: str, command: str, argv: str, fragment: str) -> Case:
    return Case(id, command, tuple(argv.split()), fragment)


CASES: list[Case] = [
    # nulls and empty values
    case("null", "train", "train.lr=null", "config key 'train.lr' cannot be null"),
    case("empty-value", "train", "train.batch_size= run_dir=<new>",
         "config key 'train.batch_size' cannot be null"),
    case("tilde-null", "train", "model.num_ch=~", "config key 'model.num_ch' cannot be null"),
    case("empty-experiment", "train", "experiment=", "experiment '' not found"),
    # wrong types
    case("str-for-int", "train", "train.max_steps=abc", "config key 'train.max_steps' expects int"),
    case("float-for-int", "train", "train.batch_size=2.5 run_dir=<new>",
         "config key 'train.batch_size' expects int"),
    case("str-in-int-list", "train", "model.latent_scales=[a]", "config key 'model.latent_scales' expects list"),
    case("str-for-bool", "train", "data.binarize=maybe", "config key 'data.binarize' expects bool"),
    case("int-for-bool", "train", "train.compile=1", "config key 'train.compile' expects bool"),
    # unknown keys, syntax, repeats, interpolations
    case("unknown-key", "train", "train.lrr=0.1", "unknown config key 'train.lrr'"),
    case("unknown-section", "train", "optim.lr=0.1", "unknown config key 'optim.lr'"),
    case("key-under-a-value", "train", "train.lr.x=1", "unknown config key 'train.lr.x'"),
    case("not-key-value", "train", "train.lr", "argument 'train.lr' is not key=value"),
    case("empty-key", "train", "=5 run_dir=<new>", "argument '=5' is not key=value"),
    case("key-twice", "train", "train.lr=1 train.lr=2", "key 'train.lr' is given twice"),
    case("unparsable-list", "train", "model.latent_scales=[2,2",
         "config key 'model.latent_scales': cannot parse the value '[2,2'"),
    case("int-beyond-int64", "train", "train.batch_size=99999999999999999999 run_dir=<new>",
         "config key 'train.batch_size' = 99999999999999999999 is too large"),
    case("interpolation", "train", "train.lr=${nope}", "config key 'train.lr': cannot resolve"),
    # NaN and infinities
    case("nan", "train", "train.lr=.nan", "config key 'train.lr' must be a finite number"),
    case("inf", "train", "train.lr=.inf run_dir=<new>", "config key 'train.lr' must be a finite number"),
    case("minus-inf", "train", "train.lr=-.inf", "config key 'train.lr' must be a finite number"),
    # ranges
    case("batch-larger-than-split", "train", "train.batch_size=5000 run_dir=<new>",
         "train.batch_size=5000 is larger than the training split"),
    case("num-threads-negative", "train", "train.num_threads=-1", "train.num_threads=-1 is out of range"),
    case("log-every-zero", "train", "train.log_every=0", "train.log_every=0 is out of range"),
    case("lr-epochs-zero", "train", "train.lr_epochs=0", "train.lr_epochs=0 is out of range"),
    case("max-steps-negative", "train", "train.max_steps=-1", "train.max_steps=-1 is out of range"),
    case("eval-batch-zero", "train", "eval.batch_size=0", "eval.batch_size=0 is out of range"),
    case("max-images-negative", "train", "eval.max_images=-1", "eval.max_images=-1 is out of range"),
    case("ema-one", "train", "train.ema=1", "train.ema=1 is out of range"),
    case("dropout-one", "train", "model.diffusion.dropout=1", "model.diffusion.dropout=1 is out of range"),
    case("lr-zero", "train", "train.lr=0", "train.lr=0 is out of range"),
    case("lr-min-above-lr", "train", "train.lr_min=0.1", "train.lr_min=0.1 must be below train.lr=0.01"),
    case("logvar-order", "train", "model.min_logvar=2", "model.min_logvar=2 must be below model.max_logvar=1.0"),
    case("patience-zero", "train", "train.patience=0", "train.patience=0 is out of range"),
    case("seed-beyond-2-32", "train", "train.seed=1099511627776",
         "train.seed=1099511627776 is out of range: it must be in [0, 4294967295]"),
    case("split-seed-negative", "train", "data.split_seed=-1", "data.split_seed=-1 is out of range"),
    case("num-threads-huge", "train", "train.num_threads=100000", "train.num_threads=100000 is out of range: "
         "it must be in [1, 1024]"),
    case("zero-stage-4", "train", "dist.zero_stage=4", "dist.zero_stage=4 is not allowed"),
    # choices and combinations
    case("precision-fp8", "train", "train.precision=fp8", "train.precision='fp8' is not allowed"),
    case("dataset-unknown", "train", "data.name=imagenet", "data.name='imagenet' is not allowed"),
    case("eval-precision-fp16", "train", "eval.precision=fp16", "eval.precision='fp16' is not allowed"),
    case("wandb-mode", "train", "wandb.mode=loud", "wandb.mode='loud' is not allowed"),
    case("wandb-mode-yaml-bool", "train", "wandb.mode=on", "config key 'wandb.mode' expects str (default "
         "'offline'), got True; choose one of ['online', 'offline', 'disabled']"),
    case("ctx-size-above-image", "train", "model.ctx_size=9", "model.ctx_size=9 must be in [1, 8]"),
    case("latent-scales-too-deep", "train", "model.latent_scales=[1,1,1,1]", "model.latent_scales has 4 groups"),
    case("latent-scales-empty", "train", "model.latent_scales=[]", "model.latent_scales=[]"),
    case("latent-width-vs-channels", "train", "model.latent_width=2",
         "model.latent_width=2 must equal the image channels (1) while model.latent_aggregation=true; "
         "set model.latent_width=1"),
    case("likelihood-vs-binarize", "train", "data.binarize=false",
         "model.likelihood=bernoulli needs data.binarize"),
    # experiment confinement
    case("experiment-parent", "train", "experiment=../defaults", "experiment '../defaults' not found"),
    case("experiment-absolute", "train", "experiment=/etc/passwd", "experiment '/etc/passwd' not found"),
    case("experiment-missing", "train", "experiment=mnist/nope", "experiment 'mnist/nope' not found"),
    case("experiment-dotdot-inside", "train", "experiment=mnist/../mnist/dvp_vae",
         "experiment 'mnist/../mnist/dvp_vae' not found"),
    # output paths
    case("run-dir-is-file", "train", "run_dir=<text>", "run_dir=<text> is an existing file"),
    case("run-dir-under-file", "train", "run_dir=<text>/sub",
         "run_dir=<text>/sub cannot be created: <text> is a file"),
    case("run-dir-unwritable", "train", "run_dir=<unwritable>", "run_dir=<unwritable> is not writable"),
    case("eval-out-missing-folder", "eval", "run_dir=<run> out=<missing>/r.json",
         "out=<missing>/r.json: folder <missing> does not exist"),
    case("eval-out-directory", "eval", "run_dir=<run> out=<folder>", "out=<folder> is a directory"),
    case("sample-out-under-file", "sample", "run_dir=<run> out=<text>/grid.png",
         "out=<text>/grid.png: <text> is a file"),
    case("eval-out-fifo", "eval", "run_dir=<run> out=<fifo>", "out=<fifo> is not a regular file"),
    case("sample-out-fifo", "sample", "run_dir=<run> out=<fifo>", "out=<fifo> is not a regular file"),
    # data
    case("mnist-root-text-file", "train", "data.name=mnist data.root=<text> run_dir=<new>",
         "<text>: cannot be read as an .npz archive: it is a text file"),
    case("mnist-root-missing", "train", "data.name=mnist data.root=<missing>",
         "mnist: data.root <missing> does not exist"),
    case("npz-root-empty", "train", "data.name=npz data.root=<empty>",
         "<empty>: cannot be read as an .npz archive: it is empty"),
    case("omniglot-no-root", "train", "data.name=omniglot", "omniglot: no data.root given"),
    case("val-size-too-large", "train", "data.val_size=5000", "digits: data.val_size=5000 must be in"),
    # checkpoints and resuming
    case("eval-run-dir-missing", "eval", "run_dir=<missing>", "run_dir=<missing> is not a directory"),
    case("eval-no-run-dir", "eval", "eval.is_samples=4", "give run_dir=DIR"),
    case("eval-checkpoint-empty-arg", "eval", "run_dir=<run> checkpoint=", "checkpoint= is empty"),
    case("eval-checkpoint-missing", "eval", "run_dir=<run> checkpoint=<missing>/x.pt",
         "checkpoint <missing>/x.pt does not exist"),
    case("eval-checkpoint-directory", "eval", "run_dir=<run> checkpoint=<folder>",
         "checkpoint <folder> is a directory"),
    case("eval-checkpoint-empty-file", "eval", "run_dir=<run> checkpoint=<empty>",
         "<empty> is not a dvp checkpoint: empty file"),
    case("eval-checkpoint-text", "eval", "run_dir=<run> checkpoint=<text>",
         "<text> is not a dvp checkpoint: a text file"),
    case("eval-checkpoint-random", "eval", "run_dir=<run> checkpoint=<random>",
         "<random> is not a dvp checkpoint: random or binary data"),
    case("eval-checkpoint-noise-80", "eval", "run_dir=<run> checkpoint=<noise80>",
         "<noise80> is not a dvp checkpoint: random or binary data"),
    case("eval-checkpoint-truncated", "eval", "run_dir=<run> checkpoint=<truncated>",
         "<truncated> is not a dvp checkpoint: truncated torch file"),
    case("eval-checkpoint-config-vs-weights", "eval", "run_dir=<run> checkpoint=<mismatch>",
         "<mismatch>: ema weights: shapes differ from the config at key"),
    case("sample-checkpoint-truncated", "sample", "run_dir=<run> checkpoint=<truncated>",
         "<truncated> is not a dvp checkpoint: truncated torch file"),
    case("resume-change-model", "train", "run_dir=<run> model.num_ch=16",
         "cannot change model.* when resuming <run>"),
    case("resume-change-data", "train", "run_dir=<run> data.split_seed=7",
         "cannot change data.* when resuming <run>"),
    case("resume-bad-type", "train", "run_dir=<run> train.lr=abc", "config key 'train.lr' expects float"),
    case("resume-batch-larger-than-split", "train", "run_dir=<run> train.batch_size=5000",
         "train.batch_size=5000 is larger than the training split"),
    case("resume-missing-last", "train", "run_dir=<new> train.resume=true",
         "train.resume=true but <new>/checkpoints/last.pt does not exist"),
    # dvp-sample options
    case("sample-n-zero", "sample", "run_dir=<run> n=0", "n=0 must be in [1, 10000]"),
    case("sample-n-text", "sample", "run_dir=<run> n=abc", "n=abc is not an integer"),
    case("sample-n-float", "sample", "run_dir=<run> n=1e3", "n=1e3 is not an integer"),
    case("sample-n-huge", "sample", "run_dir=<run> n=99999999999999999999999",
         "n=99999999999999999999999 must be in [1, 10000]"),
    case("sample-temperature-text", "sample", "run_dir=<run> temperature=warm",
         "temperature=warm is not a number"),
    case("sample-temperature-nan", "sample", "run_dir=<run> temperature=nan", "temperature=nan must be a finite"),
    case("sample-temperature-zero", "sample", "run_dir=<run> temperature=0", "temperature=0 must be a finite"),
    case("sample-temperature-inf", "sample", "run_dir=<run> temperature=inf", "temperature=inf must be a finite"),
    case("sample-seed-negative", "sample", "run_dir=<run> seed=-1", "seed=-1 must be in [0, 4294967295]"),
    case("sample-seed-huge", "sample", "run_dir=<run> seed=99999999999999999999",
         "seed=99999999999999999999 must be in [0, 4294967295]"),
    case("sample-key-not-allowed", "sample", "run_dir=<run> model.num_ch=3", "'model.num_ch' cannot be set here"),
    case("sample-n-twice", "sample", "run_dir=<run> n=4 n=5", "key 'n' is given twice"),
    # dvp-eval options
    case("eval-is-samples-zero", "eval", "run_dir=<run> eval.is_samples=0", "eval.is_samples=0 is out of range"),
    case("eval-max-images-negative", "eval", "run_dir=<run> eval.max_images=-1",
         "eval.max_images=-1 is out of range"),
    case("eval-precision-fp8", "eval", "run_dir=<run> eval.precision=fp8", "eval.precision='fp8' is not allowed"),
    case("eval-key-not-allowed", "eval", "run_dir=<run> train.lr=1",
         "'train.lr' cannot be set here; allowed: run_dir, checkpoint, artifact, out, eval.*, "
         "train.eval_batch_size, data.root"),
    case("eval-unknown-eval-key", "eval", "run_dir=<run> eval.nope=1", "unknown config key 'eval.nope'"),
    case("eval-is-samples-text", "eval", "run_dir=<run> eval.is_samples=abc",
         "config key 'eval.is_samples' expects int"),
    case("eval-unparsable-value", "eval", "run_dir=<run> eval.max_images=[1",
         "config key 'eval.max_images': cannot parse the value '[1'"),
    case("eval-weights-choice", "eval", "run_dir=<run> eval.weights=best", "eval.weights='best' is not allowed"),
    # dvp-info
    case("info-null", "info", "train.lr=null", "config key 'train.lr' cannot be null"),
    case("info-experiment-parent", "info", "experiment=../defaults", "experiment '../defaults' not found"),
    case("info-ctx-size", "info", "model.ctx_size=9", "model.ctx_size=9 must be in [1, 8]"),
    case("info-npz-empty", "info", "data.name=npz data.root=<empty>",
         "<empty>: cannot be read as an .npz archive"),
]

SUBPROCESS: list[Case] = [   # one per command: each takes seconds (imports)
    case("resume-change-model", "train", "run_dir=<run> model.num_ch=16 wandb.mode=disabled",
         "cannot change model.* when resuming <run>"),
    case("eval-checkpoint-random", "eval", "run_dir=<run> checkpoint=<random>",
         "<random> is not a dvp checkpoint: random or binary data"),
    case("sample-temperature-zero", "sample", "run_dir=<run> temperature=0", "temperature=0 must be a finite"),
    case("info-experiment-absolute", "info", "experiment=/etc/passwd", "experiment '/etc/passwd' not found"),
]


# --------------------------------------------------------------------------------------------- fixtures

def _write_inputs(inputs: Path, last: Path) -> None:
    """The bad files the cases point at (all derived from the trained run's last.pt or fixed bytes)."""
    inputs.mkdir()
    (inputs / "folder").mkdir()
    (inputs / "notes.txt").write_text("these are notes, not a dataset or a checkpoint\n")
    (inputs / "empty.bin").write_bytes(b"")
    noise = random.Random(0).randbytes(4096)
    (inputs / "random.bin").write_bytes(b"\x17" + noise)          # no zip, pickle or text start
    (inputs / "noise80.bin").write_bytes(b"\x80" + noise)         # a pickle opcode, then noise
    os.mkfifo(inputs / "fifo")                                     # an output that must not be replaced
    data = last.read_bytes()
    (inputs / "truncated.pt").write_bytes(data[:len(data) // 2])
    state = torch.load(last, map_location="cpu", weights_only=True)
    state["config"]["model"]["num_ch"] = 16
    save_checkpoint(inputs / "mismatch.pt", {k: v for k, v in state.items() if k not in ("format", "version")})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run (digits, 20 steps = one epoch: best.pt, last.pt, metrics, images, best.eval.json) and
    the bad input files, side by side."""
    root = tmp_path_factory.mktemp("bad_inputs")
    threads = torch.get_num_threads()
    try:   # one thread: two threads on a shared 2-core machine run several times slower
        assert dvp.cli.train.main([*RUN_ARGS, "train.num_threads=1", f"run_dir={root / 'run'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    _write_inputs(root / "inputs", root / "run" / "checkpoints" / "last.pt")
    return root


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), folder (path/ -> b'') and other entry (its type)."""
    def content(p: Path) -> bytes:
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            return f"<mode {stat.S_IFMT(p.lstat().st_mode):o}>".encode()
        return p.read_bytes() if p.is_file() else b""
    return {p.relative_to(directory).as_posix() + ("/" if p.is_dir() else ""): content(p)
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def before(root: Path) -> dict[str, bytes]:
    files = snapshot(root)
    expected = ("run/checkpoints/best.pt", "run/checkpoints/last.pt", "run/metrics.jsonl", "run/config.yaml")
    assert set(expected) <= set(files)
    assert any(name.startswith("run/images/") and name.endswith(".png") for name in files)
    return files


# ------------------------------------------------------------------------------------------------ running

def run_in_process(c: Case, paths: Paths, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = MAINS[c.command]([paths.fill(a) for a in c.argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(c: Case, paths: Paths) -> tuple[int, str, str]:
    """`python -m dvp.<command> argv` in `paths.cwd`: the real entry point, its imports and its exit status."""
    res = subprocess.run([sys.executable, "-m", MODULES[c.command], *(paths.fill(a) for a in c.argv)],
                         capture_output=True, text=True, cwd=paths.cwd, timeout=300)
    return res.returncode, res.stdout, res.stderr


def check(c: Case, paths: Paths, result: tuple[int, str, str], before: dict[str, bytes]) -> str:
    """Assert the case's outcome; returns its error line."""
    code, out, err = result
    lines = err.splitlines()
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert not [word for word in FORBIDDEN if word in err + out], err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert paths.fill(c.fragment) in lines[0]
    assert out == ""
    assert list(paths.cwd.iterdir()) == []                 # no runs/<...>, no new/, no output file
    after = snapshot(paths.root)
    assert sorted(set(after) - set(before)) == [], "new files"
    assert [name for name in before if after.get(name) != before[name]] == [], "changed or removed files"
    return lines[0]


def test_cases_are_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 45
    assert len({(c.command, c.argv) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[f"{c.command}-{c.id}" for c in CASES])
def test_bad_input(c: Case, root: Path, before: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    paths = Paths(root, tmp_path)
    check(c, paths, run_in_process(c, paths, capsys), before)


@pytest.mark.parametrize("c", SUBPROCESS, ids=[f"{c.command}-{c.id}" for c in SUBPROCESS])
def test_bad_input_subprocess(c: Case, root: Path, before: dict[str, bytes], tmp_path: Path) -> None:
    paths = Paths(root, tmp_path)
    check(c, paths, run_subprocess(c, paths), before)
