"""Every command the docs show is run by a test, so a documented command that breaks fails CI.

COMMANDS holds every command line of the ```bash blocks of README.md and docs/*.md (tests/helpers/docs.py reads
them) with what runs it: the test that runs it at a small size (`Runs`), the test that reads it from its page and
runs what the page says (`Reads`, through `documented_command`), a line of `.ci/run` (`CI`), this file at a small
size (`Here`), or why it cannot run here (`Cannot`: a GPU, a cloud account, a terminal). A command added to the
docs without an entry, an entry whose command left the docs and an entry naming a test that does not exist all
fail here, in seconds: nothing is run twice (the named tests run in their own marks). The docs' file paths and the
docstrings' references to docs/model.md are checked too.
"""
from __future__ import annotations

import ast
import configparser
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.docs import ROOT, commands, matches, pages


@dataclass(frozen=True)
class Runs:
    """`test` ("tests/<file>.py::<function>[<parameter>]") runs the command, at a small size."""
    test: str


@dataclass(frozen=True)
class Reads:
    """`test` runs the command as `documented_command(page, <the key>, ...)` reads it from its page: the key is the
    command's first words, by the helper's own rule (`matches`), so the placeholders (R, G, DIR, ...) are filled."""
    test: str


@dataclass(frozen=True)
class CI:
    """`.ci/run` runs the command as this line (its first words)."""
    line: str


@dataclass(frozen=True)
class Here:
    """This file runs the console script in-process with these arguments added (a small size, a temporary run dir)."""
    extra: tuple[str, ...]


@dataclass(frozen=True)
class Cannot:
    """Why no test can run the command here."""
    why: str


QUICK = "tests/test_benchmarks.py::test_benchmark_quick_check"      # every benchmark's quick check (mark slow)
RAY_UP = ("tests/test_multinode_ray.py::"
          "test_ray_up_on_a_head_and_a_worker_host_runs_a_sweep_on_both_with_token_auth_and_ray_down_clears_both")
SLURM_SWEEP = "tests/test_multinode_ray.py::test_slurm_sweep_on_two_hosts_with_token_auth_requeues_on_usr1_and_reports"
SLURM_TRAIN = ("tests/test_clusters.py::"
               "test_slurm_train_job_completes_and_a_usr1_job_requeues_and_ends_where_it_would_have")
SLURM_TWO_NODES = ("tests/test_multinode.py::"
                   "test_slurm_job_on_two_slurmd_hosts_trains_one_model_and_a_usr1_requeue_resumes_exactly")
SWEEP = "tests/test_sweep.py::test_sweep_asha_report_wandb_and_reproduce"
EVAL_SAMPLE = "tests/test_train.py::test_eval_and_sample_clis_read_the_run"

COMMANDS: dict[str, Runs | Reads | CI | Here | Cannot] = {
    # README.md: set-up and tests
    'pip install -e ".[test]"': CI('python -m pip install -e ".[test]"'),
    "ruff check .": CI("ruff check ."),
    "pytest": CI("mark"),
    "pytest -m distributed": CI("mark -m distributed"),
    "pytest -m sweep -n 0": CI("mark -m sweep -n 0"),
    "pytest -m cluster -n 0": CI("mark -m cluster -n 0"),
    "pytest -m multinode -n 0": CI("mark -m multinode -n 0"),
    "pytest -m slow --dist load": CI("mark -m slow --dist load"),
    "DVP_TEST_GPU=1 pytest -m gpu -n 0 tests/test_gpu.py":
        Cannot("a CUDA GPU (CI has none): benchmarks/gpu_check.py runs it on a GPU machine"),
    # docs/training.md (and the README's main commands)
    "dvp-train": Runs("tests/test_train.py::test_default_train_writes_a_complete_run_dir"),
    "dvp-train experiment=mnist/dvp_vae data.root=../shared/data":
        Runs("tests/test_train.py::test_short_training_on_real_mnist_lowers_the_test_nelbo"),
    "dvp-train experiment=digits/ladder train.lr=5e-3":
        Here(("train.max_steps=1", "train.batch_size=16", "train.final_eval=false", "wandb.mode=disabled")),
    "dvp-train experiment=mnist/dvp_vae train.precision=bf16 train.channels_last=true train.compile=true":
        Runs(f"{QUICK}[quality_330.sh]"),
    "dvp-train run_dir=runs/mnist/dvp_vae/20261125-080000":
        Runs("tests/test_resume.py::test_kill_9_then_resume_equals_the_uninterrupted_run"),
    "dvp-eval run_dir=runs/... eval.is_samples=1000": Runs(EVAL_SAMPLE),
    "dvp-sample run_dir=runs/... n=64 temperature=0.8": Runs(EVAL_SAMPLE),
    "dvp-info experiment=mnist/dvp_vae":
        Runs("tests/test_config.py::test_dvp_info_prints_resolved_config_and_params_last"),
    # docs/distributed.md
    "torchrun --nproc_per_node 8 -m dvp.train experiment=cifar10/dvp_vae dist.zero_stage=2 train.precision=bf16":
        Runs("tests/test_distributed.py::test_world_size_invariance_fp32_zero_0_and_2"),
    "mpiexec -n 4 dvp-train experiment=mnist/dvp_vae":
        Runs("tests/test_distributed.py::test_mpiexec_launch_equals_torchrun"),
    "srun python -m dvp.train experiment=mnist/dvp_vae": Runs(SLURM_TRAIN),
    "deepspeed --num_gpus 8 --module dvp.train ...":
        Cannot("8 GPUs: its CPU form, the next command, runs in tests/test_launchers.py"),
    "DS_ACCELERATOR=cpu deepspeed --num_gpus 2":
        Reads("tests/test_launchers.py::test_the_deepspeed_launcher_trains_two_cpu_processes_like_one"),
    "torchrun --nproc_per_node 2 -m dvp.evaluate run_dir=DIR":
        Runs("tests/test_distributed.py::test_sharded_evaluation_equals_one_process"),
    "torchrun --nnodes": Reads("tests/test_multinode.py::test_torchrun_on_two_hosts_trains_the_one_process_model"),
    "mpiexec --host": Reads("tests/test_multinode.py::test_mpiexec_over_ssh_on_two_hosts_trains_the_one_process_model"),
    # docs/sweeps.md
    "dvp-sweep sweep=digits_depth_pseudo": Runs(f"{QUICK}[sweep_asha_vs_grid.py]"),
    "python sweeps/sweep.py sweep=mnist_depth_pseudo data.root=../shared/data storage=/nfs/sweeps": Runs(RAY_UP),
    "dvp-sweep sweep=my.yaml num_samples=4 resources.workers=[1,4] train.max_epochs=20":
        Runs("tests/test_multinode_ray.py::"
             "test_a_cut_cable_shrinks_an_elastic_trial_a_new_host_grows_it_and_the_report_comes_from_s3"),
    "ray submit CLUSTER.yaml sweeps/sweep.py -- sweep=mnist_depth_pseudo ray.address=auto": Runs(RAY_UP),
    "dvp-report runs/sweeps/digits_depth_pseudo": Runs(SWEEP),
    "dvp-report runs/sweeps/digits_depth_pseudo eval=true workers=2": Runs(SWEEP),
    "dvp-report runs/sweeps/mnist_depth_pseudo wandb=true":
        Runs("tests/test_wandb_report.py::test_report_published_to_the_sweeps_group"),   # a stand-in W&B server
    # docs/clusters.md
    "ray up cluster/local.yaml": Runs(RAY_UP),
    "ray submit cluster/local.yaml sweeps/sweep.py -- sweep=mnist_depth_pseudo ray.address=auto data.root=/data":
        Runs(RAY_UP),
    "ray attach cluster/local.yaml": Cannot("an interactive shell on the head: it needs a terminal"),
    "ray down cluster/local.yaml": Runs(RAY_UP),
    "sbatch cluster/slurm/train.sbatch experiment=mnist/dvp_vae data.root=/data train.precision=bf16":
        Runs(SLURM_TRAIN),
    "sbatch --nodes=4 --time=12:00:00 cluster/slurm/train.sbatch experiment=cifar10/dvp_vae dist.zero_stage=2":
        Runs(SLURM_TWO_NODES),
    "sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 cluster/slurm/train.sbatch": Runs(SLURM_TRAIN),
    "sbatch cluster/slurm/sweep.sbatch sweep=mnist_depth_pseudo data.root=/data storage=/nfs/sweeps":
        Runs(SLURM_SWEEP),
    "sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 cluster/slurm/sweep.sbatch sweep=digits_smoke":
        Runs(SLURM_SWEEP),
    # docs/benchmarks.md
    "python benchmarks/train_throughput.py --data-root ../shared/data": Runs(f"{QUICK}[train_throughput.py]"),
    "python benchmarks/distributed.py": Runs(f"{QUICK}[distributed.py]"),
    "bash benchmarks/quality_330_seeds.sh ../shared/data": Runs(f"{QUICK}[quality_330_seeds.sh]"),
    "bash benchmarks/mnist_budget.sh ../shared/data 30": Runs(f"{QUICK}[mnist_budget.sh]"),
    "python benchmarks/is_vs_exact.py": Runs(f"{QUICK}[is_vs_exact.py]"),
    "python benchmarks/latent_usage.py train dvp_vae ladder --data-root ../shared/data --minutes 33":
        Runs(f"{QUICK}[latent_usage.py]"),
    "python benchmarks/gpu_check.py --data-root DIR":
        Cannot(f"a CUDA GPU (CI has none): its --quick CPU form runs in {QUICK}[gpu_check.py]"),
}


def entries(command: str) -> list[str]:
    """The keys of COMMANDS that name `command`: its own line, or the first words of a `Reads` entry."""
    return [key for key, entry in COMMANDS.items()
            if key == command or (isinstance(entry, Reads) and matches(command, key))]


def documented() -> list[tuple[str, str]]:
    return [(page, command) for page in pages() for command in commands(page)]


def test_every_documented_command_has_exactly_one_entry() -> None:
    missing = [f"{page}: {command}" for page, command in documented() if len(entries(command)) != 1]
    assert not missing, "commands without exactly one entry in tests/test_docs.py's COMMANDS:\n" + "\n".join(missing)


def test_every_entry_names_a_command_the_docs_show() -> None:
    shown = {key for _, command in documented() for key in entries(command)}
    assert set(COMMANDS) <= shown, f"entries whose command no page shows: {sorted(set(COMMANDS) - shown)}"


def _functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("key", [key for key, entry in COMMANDS.items() if isinstance(entry, (Runs, Reads))])
def test_the_named_test_exists(key: str) -> None:
    entry = COMMANDS[key]
    assert isinstance(entry, (Runs, Reads))
    name = re.fullmatch(r"(tests/\w+\.py)::(\w+)(?:\[(.+)\])?", entry.test)
    assert name, f"{entry.test!r} is not tests/<file>.py::<function>[<parameter>]"
    path = ROOT / name[1]
    assert path.is_file(), f"{key}: {name[1]} does not exist"
    assert name[2] in _functions(path), f"{key}: {name[1]} has no test {name[2]}"
    if name[3]:
        assert repr(name[3]) in path.read_text() or f'"{name[3]}"' in path.read_text(), \
            f"{key}: {name[1]} has no parameter {name[3]}"
    if isinstance(entry, Reads):     # the test reads this command from its page, by these first words
        assert re.search(r'documented_command\(\s*"(docs/\w+\.md|README\.md)",\s*' + re.escape(f'"{key}"'),
                         path.read_text()), f"{name[1]} does not read {key!r} with documented_command"


@pytest.mark.parametrize("key", [key for key, entry in COMMANDS.items() if isinstance(entry, Reads)])
def test_a_read_command_is_one_command_of_its_page(key: str) -> None:
    """What `documented_command` asserts when the test runs, checked here for every mark."""
    page = re.search(r'documented_command\(\s*"([^"]+)",\s*' + re.escape(f'"{key}"'),
                     (ROOT / COMMANDS[key].test.split("::")[0]).read_text())
    assert page and sum(matches(command, key) for command in commands(page[1])) == 1, key


def _ci_lines() -> list[str]:
    text = (ROOT / ".ci/run").read_text()
    return [" ".join(re.sub(r"(^|\s)#.*$", "", line).split()) for line in text.splitlines()]


@pytest.mark.parametrize("key", [key for key, entry in COMMANDS.items() if isinstance(entry, CI)])
def test_ci_runs_the_command(key: str) -> None:
    line = COMMANDS[key].line
    assert any(matches(ci, line) for ci in _ci_lines()), f".ci/run has no line {line!r} ({key})"


def _console_script(name: str):
    """The function behind a console script of setup.cfg (dvp-train -> dvp.cli.train:main)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].split("\n")
                   if line.strip())
    module, function = scripts[name].split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("key", [key for key, entry in COMMANDS.items() if isinstance(entry, Here)])
def test_the_command_runs_here_at_a_small_size(key: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    program, *args = key.split()
    main = _console_script(program)
    assert main([*args, *COMMANDS[key].extra, f"run_dir={tmp_path / 'run'}"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


PATH = re.compile(r"(?<![\w/.-])((?:dvp|tests|benchmarks|cluster|configs|sweeps|docs)/[\w./-]*\w\."
                  r"(?:py|md|yaml|sh|sbatch))")


@pytest.mark.parametrize("page", pages())
def test_the_files_a_page_names_exist(page: str) -> None:
    named = set(PATH.findall((ROOT / page).read_text()))
    assert named, page
    assert not [p for p in sorted(named) if not (ROOT / p).exists()], f"{page} names files that do not exist"


def test_references_to_docs_model_md_name_its_sections_and_equations() -> None:
    """Every `docs/model.md §N, eq(s). (a)-(b)` in the code and the docs names a section and equations it has."""
    model = (ROOT / "docs/model.md").read_text()
    sections = set(re.findall(r"^## §(\d+) ", model, re.M))
    equations = set(re.findall(r"\((\d+)\)$", model, re.M))
    files = [*(ROOT / "dvp").rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / p for p in pages())]
    bad = []
    for path in files:
        for ref in re.findall(r"docs/model\.md(?:\]\(model\.md\))? (§[^a-z\n]*(?:eqs?\. [()\d, -]*)?)",
                              path.read_text()):
            bad += [f"{path.relative_to(ROOT)}: §{n}" for n in re.findall(r"§(\d+)", ref) if n not in sections]
            bad += [f"{path.relative_to(ROOT)}: ({n})" for n in re.findall(r"\((\d+)\)", ref) if n not in equations]
    assert len(sections) >= 8 and len(equations) >= 29 and not bad, bad


def _defined(path: Path) -> set[str]:
    """The names `path` defines at any depth: functions, classes, and fields or constants assigned to a name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def test_the_code_docs_model_md_names_exists() -> None:
    """In each "Code:" paragraph of docs/model.md, every `name` after a `dvp/....py` is defined in that file."""
    model = (ROOT / "docs/model.md").read_text()
    missing, seen = [], 0
    for paragraph in re.findall(r"^Code: (.*?)(?:\n\n|\Z)", model, re.M | re.S):
        path = None
        for token in re.findall(r"`([^`]+)`", paragraph):
            if "/" in token:
                path = ROOT / token if token.endswith(".py") else None
                assert path is None or path.is_file(), f"docs/model.md names {token}, which does not exist"
            elif path is not None and re.fullmatch(r"[A-Za-z_][\w.]*", token):
                seen += 1
                missing += [f"{path.relative_to(ROOT)}: {token}" for name in token.split(".")
                            if name not in _defined(path)]
    assert seen > 40 and not missing, missing
