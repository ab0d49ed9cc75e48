"""Sweeps across hosts made of Linux namespaces (tests/helpers/netns.py): Ray with its head on one host and workers on
others, started by Slurm's cluster/slurm/sweep.sbatch, by hand (`ray start`) and by Ray's cluster launcher over
SSH (cluster/local.yaml), with token auth on, a cable cut under a running trial, and the sweep's storage on a
shared folder or on an S3 server (moto) on host 0. Marked `multinode` (root; CI runs the mark with -n 0)."""
from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.clusters import wait_for
from helpers.netns import Hosts
from test_distributed import _env

from dvp.train.logger import read_metrics
from dvp.tune.ray_stop import ray_processes

pytestmark = pytest.mark.multinode
ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def short() -> Iterator[Path]:
    """A folder straight under /tmp (Ray's socket paths must stay under 107 characters; munged, running as
    munge, must enter it)."""
    path = Path(tempfile.mkdtemp(prefix="dvpr-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not os.environ.get("DVP_KEEP_TEST_FILES"):       # set it to look at the hosts' logs after a failure
        shutil.rmtree(path, ignore_errors=True)


def val(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "val"]


def reported(trial_folder: Path) -> list[dict[str, Any]]:
    """What a trial reported to Tune (its result.json lines)."""
    return [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines() if line.strip()]


def ray_status(hosts: Hosts, i: int, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray status --address` from host i: what a client of the cluster's GCS gets."""
    return hosts.run(i, [*RAY, "status", f"--address={address}"], timeout=120,
                     env={"RAY_USAGE_STATS_ENABLED": "0", **env})


def check_token_auth(hosts: Hosts, outsider: int, address: str, token: Path, base: Path) -> None:
    """From a host outside the cluster: no token and a wrong token are refused by the GCS, the job's token is
    let in (so the refusals are the token's doing, not the network's)."""
    wrong = base / "wrong_token"
    wrong.write_text("0" * 64 + "\n")
    home = base / "outsider-home"                      # no ~/.ray/auth_token there
    home.mkdir(exist_ok=True)
    for env in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}):
        out = ray_status(hosts, outsider, address, {"HOME": str(home), **env})
        assert out.returncode != 0 and "InvalidAuthToken" in out.stdout + out.stderr, (env, out)
    out = ray_status(hosts, outsider, address, {"HOME": str(home), "RAY_AUTH_MODE": "token",
                                                "RAY_AUTH_TOKEN_PATH": str(token)})
    assert out.returncode == 0 and "Active:" in out.stdout, out


def check_report(folder: Path, runs: Path, epochs: list[int]) -> list[dict[str, str]]:
    """The sweep's report and best.json agree with each trial's own validation records (in `runs`)."""
    rows = list(csv.DictReader((folder / "report/trials.csv").open()))
    assert rows and {r["status"] for r in rows} == {"TERMINATED"}, rows
    for row in rows:
        records = val(runs / row["trial_id"])
        assert [r["epoch"] for r in records] == epochs, (row["trial_id"], records)     # each epoch once
        assert float(row["best"]) == pytest.approx(min(r["nelbo"] for r in records), rel=1e-6)
        assert row["stopped_early"] == "False"
    best = json.loads((folder / "best.json").read_text())
    assert best["value"] == pytest.approx(min(float(r["best"]) for r in rows), rel=1e-6)
    assert all((folder / "report" / f).stat().st_size > 0 for f in ("trials.md", "learning_curves.png"))
    return rows


# ---- Slurm: sweep.sbatch over two slurmd hosts ------------------------------------------------------------------
def test_slurm_sweep_on_two_hosts_with_token_auth_requeues_on_usr1_and_reports(short: Path) -> None:
    """sbatch --nodes=2 cluster/slurm/sweep.sbatch sweep=digits_smoke on two slurmd hosts (node-local /tmp for
    Ray's sessions; the storage, a shared folder): the Ray head on node0, a worker on node1, every trial's two
    workers one per host (their Tune results say so). Token auth: a per-job token file of mode 0600; from node2,
    outside the job, a client without it or with another is refused, with it let in. USR1 (the time-limit
    warning) interrupts the sweep, stops Ray on both hosts and requeues; the requeued job resumes the sweep
    mid-trial, finishes it and writes a complete report and best.json; the checks from node2 run against the
    requeued job's Ray (a new token). Trials of 4 epochs: the interrupt takes
    seconds to reach the trial, and a 2-epoch one could finish first, leaving nothing to resume. Both nodes'
    own names resolve, on themselves, to a second interface no other host reaches (tests/test_multinode.py's
    trap): the head must advertise the address the other node knows it by."""
    work, store, home, ray_tmp = short / "work", short / "sweeps", short / "home", short / "rt"
    work.mkdir()
    home.mkdir()
    env = {**_env(), "DVP_PYTHON": sys.executable, "HOME": str(home), "DVP_RAY_TMPDIR": str(ray_tmp)}
    with Hosts(short, 3, local=(ray_tmp,), trap=(0, 1)) as hosts, hosts.slurm(nodes=2) as slurm:
        job = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                            str(ROOT / "cluster/slurm/sweep.sbatch"), "sweep=digits_smoke", f"storage={store}",
                            "train.max_epochs=4", "train.lr_epochs=4"], cwd=work, env=env)
        log = work / f"dvp-sweep-{job}.out"
        folder = store / "digits_smoke"
        wait_for(lambda: list(folder.glob("trials/*/checkpoint_*")), 400, "the first registered checkpoint")
        assert slurm.run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
        token = home / ".dvp/ray-auth" / job
        first = token.read_text()
        slurm.wait_state(job, {"PENDING"}, 180)
        assert not ray_processes(str(ray_tmp)), "the interrupted job left Ray processes on a host"
        assert not token.exists(), "the interrupted job left its token"
        slurm.release(job)
        heads = wait_for(lambda: len(found := re.findall(r"Ray head (\S+) on node0, 2 nodes.*\n(?:.*\n)*?sweep "
                                                         r"digits_smoke: .*\(resumed\)", log.read_text())) and found,
                         300, "the requeued job's sweep")
        assert heads[-1].startswith(hosts.ips[0] + ":") and token.read_text() != first    # a new token per run
        assert token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)
        check_token_auth(hosts, 2, heads[-1], token, short)
        for i in range(2):                               # each host has its own Ray session folder
            assert list(hosts.local_copy(i, 0).glob("ray/session_*")), i
        assert not list(ray_tmp.glob("ray/session_*"))
        info = slurm.wait_done(job, 600)
        out = log.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-6000:] + slurm.logs()
    assert "interrupting the sweep" in out and "(resumed)" in out, out[-6000:]
    assert re.search(r"resumed at step (20|40|60)\b", out), out[-6000:]            # mid-trial, epochs of 20 steps
    assert out.count("ray_stop: stopped the Ray processes") == 4 and "dvp-sweep: exit 0" in out, out[-6000:]
    assert not ray_processes(str(ray_tmp)) and not token.exists()
    rows = check_report(folder, folder / "runs", [0, 1, 2, 3])
    for row in rows:
        results = reported(folder / f"trial_{row['trial_id']}")
        assert {r["hosts"] for r in results} == {"node0,node1"} or {r["hosts"] for r in results} == {
            "node1,node0"}, results                     # rank by rank: one worker on each host
        epochs = [r["epoch"] for r in results]          # no epoch twice (see test_clusters' note on result.json)
        assert epochs == sorted(set(epochs)) and epochs[-1] == 4, epochs


# ---- Ray started by hand on three hosts: a cut cable under an elastic trial, storage on S3 ----------------------
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3"}
"""A lost node found in ~5 s instead of Ray's default ~30 s (system settings a cluster's head may set too)."""
EPOCHS = 12
"""Epochs of the elastic trial: after the cut it must run on 1 worker long enough (~10 epochs, ~60 s) for node2
to join (~20 s) and Ray Train's resize check (every 10 s) to grow it back before the trial ends."""
ELASTIC = ["model.num_ch=16", "train.batch_size=64", f"train.max_epochs={EPOCHS}", f"train.lr_epochs={EPOCHS}",
           "train.warmup_epochs=1", "train.final_eval=false", "train.log_every=5"]


class S3:
    """moto's S3 server on host `i` (port 5000) and the environment that points pyarrow and boto3 at it."""

    def __init__(self, hosts: Hosts, i: int, log: Path) -> None:
        self.hosts, self.i = hosts, i
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{hosts.ips[i]}:5000"}
        self.proc = hosts.popen(i, [sys.executable, "-m", "moto.server", "-H", hosts.ips[i], "-p", "5000"], log)
        code = "import boto3; boto3.client('s3').create_bucket(Bucket='dvp')"
        wait_for(lambda: hosts.run(i, [sys.executable, "-c", code], env=self.env).returncode == 0, 60,
                 "moto's S3 server")

    def download(self, uri: str, local: Path) -> Path:
        """Every file under `uri` into `local` (what a user's `aws s3 cp --recursive` gets), from host i."""
        out = self.hosts.run(self.i, [sys.executable, "-c", DOWNLOAD, uri, str(local)], env=self.env)
        assert out.returncode == 0, out.stderr[-2000:]
        return local


DOWNLOAD = """\
import sys, pathlib, pyarrow.fs as pf
fs, root = pf.FileSystem.from_uri(sys.argv[1])
for info in fs.get_file_info(pf.FileSelector(root, recursive=True)):
    if info.type == pf.FileType.File:
        target = pathlib.Path(sys.argv[2], info.path[len(root):].lstrip("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f:
            target.write_bytes(f.read())
"""


def ray_node(hosts: Hosts, i: int, base: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block` on host i with its own HOME (node-local run dirs) and RAY_TMPDIR."""
    home, tmp = base / f"h{i}", base / f"r{i}"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    return hosts.popen(i, [*RAY, "start", "--block", f"--node-ip-address={hosts.ips[i]}", "--num-cpus=1",
                           "--disable-usage-stats", *args], base / f"ray{i}.log",
                       env={**_env(), **env, "HOME": str(home), "RAY_TMPDIR": str(tmp)}, cwd=ROOT)


def test_a_cut_cable_shrinks_an_elastic_trial_a_new_host_grows_it_and_the_report_comes_from_s3(short: Path) -> None:
    """Ray on node0 (head: the trial's driver, one worker) and node1 (the other worker), token auth, the sweep's
    storage on S3 (moto on node0), each host's run dirs its own. After the trial's first epoch on 2 workers,
    node1's cable is pulled: the trial goes on with 1 worker from its last checkpoint on S3; then node2 joins
    and the trial grows back to 2 workers (Ray Train's resize check every 10 s, a restart from the newest
    checkpoint). Tune sees every epoch once, the report and best.json in the bucket
    are complete although the run dirs lie on two hosts, and the validation ELBOs are within the world-size
    tolerance of the same trial run uninterrupted in 1 and in 2 processes."""
    import yaml
    token = short / "token"
    token.write_text(os.urandom(32).hex() + "\n")
    token.chmod(0o600)
    sweep = short / "elastic.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "elastic", "experiments": {"digits/dvp_vae": {"model.ctx_size": [2]}},
        "space": {"model.latent_scales": [2, 2]}, "overrides": ELASTIC, "metric": "val/nelbo", "mode": "min",
        "scheduler": {"name": "fifo"}, "resources": {"workers": [1, 2], "cpus_per_worker": 1, "check": False},
        "max_failures": 2, "wandb": {"mode": "disabled"}}))
    port = 6390
    address = None
    with Hosts(short, 3) as hosts:
        s3 = S3(hosts, 0, short / "moto.log")
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20", **s3.env}
        address = f"{hosts.ips[0]}:{port}"
        ray_node(hosts, 0, short, ["--head", f"--port={port}", '--resources={"dvp_driver": 100}',
                                   "--include-dashboard=true", "--dashboard-host=127.0.0.1"],
                 {**auth, **FAST_HEALTH})
        wait_for(lambda: ray_status(hosts, 0, address, auth).returncode == 0, 120, "the head")
        ray_node(hosts, 1, short, [f"--address={address}"], auth)
        log = short / "sweep.log"
        driver = hosts.popen(0, [sys.executable, "-m", "dvp.cli.sweep", f"sweep={sweep}", "storage=s3://dvp/sweeps",
                                 f"ray.address={address}", "ray.nodes=2"], log,
                             env={**_env(), **auth, "HOME": str(short / "h0")}, cwd=ROOT)
        runs = [short / f"h{i}" / "dvp_runs" / "elastic" for i in range(3)]

        def epochs_done() -> int:
            return max([len(val(d)) for r in runs for d in r.glob("*") if (d / "metrics.jsonl").exists()] or [0])
        # epoch 1 done: epoch 0's checkpoint is on S3 (its report, synchronous, came before epoch 1)
        wait_for(lambda: epochs_done() >= 2 or driver.poll() is not None, 600, "the trial's first epochs")
        assert "DeepSpeedEngine x 2" in log.read_text(), log.read_text()[-4000:]
        hosts.link(1, up=False)                                          # node1 is gone
        wait_for(lambda: "Engine x 1 (" in log.read_text() or driver.poll() is not None, 300,
                 "the trial on 1 worker")
        ray_node(hosts, 2, short, [f"--address={address}"], auth)        # node2 joins (it takes ~20 s)
        assert driver.wait(timeout=900) == 0, log.read_text()[-6000:]
        out = log.read_text()
        folder = s3.download("s3://dvp/sweeps/elastic", short / "bucket")
        hosts.link(1, up=True)
    assert out.index("Engine x 1 (") < out.rindex("DeepSpeedEngine x 2"), out[-6000:]   # grew back
    assert re.search(r"Engine x 1 \(.*resumed at step (20|40|60)\b", out), out[-6000:]   # from epoch 1-3's checkpoint
    trial, = (p.name.removeprefix("trial_") for p in folder.glob("trial_*"))
    results = reported(folder / f"trial_{trial}")
    assert [r["epoch"] for r in results] == list(range(1, EPOCHS + 1)), results    # every epoch told to Tune once
    sizes = [r["world_size"] for r in results]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert any("node2" in r["hosts"] for r in results) and any(r["hosts"] == "node0" for r in results), results
    staged = short / "staged"                                          # what the report read: the checkpoints
    (staged / trial).mkdir(parents=True)
    newest = sorted(p for p in (folder / "trials" / trial).glob("checkpoint_*") if p.is_dir())[-1]
    shutil.copy(newest / "metrics.jsonl", staged / trial / "metrics.jsonl")
    check_report(folder, staged, list(range(EPOCHS)))
    assert json.loads((folder / "best.json").read_text())["checkpoint"].startswith(f"s3://dvp/sweeps/elastic/trials/{trial}/")
    # the tolerance, measured: the same overrides uninterrupted in 1 process and in 2 (torchrun)
    overrides = [*json.loads((folder / "best.json").read_text())["overrides"], "wandb.mode=disabled"]
    fixed = []
    for n in (1, 2):
        ref = short / f"fixed{n}"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
        res = subprocess.run([sys.executable, *(launcher if n == 2 else []), "-m", "dvp.train", *overrides,
                              f"run_dir={ref}"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
        assert res.returncode == 0, res.stderr[-2000:]
        fixed.append([r["nelbo"] for r in val(ref)])
    elastic = [r["nelbo"] for r in val(staged / trial)]

    def gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))
    # what the world size alone does to the validation ELBO: the summation order of micro-batches of 64 against
    # 2 x 32 (the 2-process run equals one process with micro-batches of 32 to 1e-7), which Adamax turns into
    # training losses 1-2% apart by step 15 and an epoch's validation up to ~1% apart, before and after the GPU-path
    # changes alike (measured: max gaps 0.18% and 1.06% for two realisations of the same order change)
    spread = gap(fixed[1], fixed[0])
    assert 0 < spread < 3e-2, fixed
    assert gap(elastic, fixed[1]) <= 2 * spread and gap(elastic, fixed[0]) <= 2 * spread, (elastic, fixed)
    print(f"elastic {elastic}\nfixed 1 {fixed[0]}\nfixed 2 {fixed[1]}\nsizes {sizes}")


# ---- Ray's cluster launcher over SSH: cluster/local.yaml with a head and a worker host -------------------------
BASHRC = """\
export PATH={home}/bin:{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RAY_TMPDIR={ray_tmp} RAY_USAGE_STATS_ENABLED=0 TORCH_EXTENSIONS_DIR={ext}
export RAY_gcs_rpc_server_reconnect_timeout_s=10
export PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0
cd "$HOME"
"""
"""A node's login shell: its own venv first on PATH, its own Ray temp folder (Ray's token: ~/.ray/auth_token,
shipped by the YAML), a worker's Ray ending 10 s after it loses the head's GCS (Ray's default: 60 s); pip offline,
building with the venv's own setuptools (the hosts reach no package index, as on an air-gapped cluster)."""
RAY_WRAPPER = """\
#!/bin/bash
# `ray stop` (which ray up runs on every node, ray down on the head) ends this node's Ray only: every host of the
# harness shares one PID namespace, and Ray's own `ray stop` would end the other hosts' Ray too
if [ "${{1:-}}" = stop ]; then exec python -c "{stop}"; fi      # RAY_TMPDIR's Ray on this host
exec {venv}/bin/python -m ray.scripts.scripts "$@"
"""


STOP_HERE = ("import os; from dvp.tune.ray_stop import ray_processes, terminate; "
             "net = os.readlink('/proc/self/ns/net'); terminate([p for p in ray_processes(os.environ['RAY_TMPDIR']) "
             "if os.readlink(f'/proc/{p}/ns/net') == net])")


def ray_on_host(hosts: Hosts, i: int) -> list[str]:
    """The Ray processes in host i's network namespace (its raylet, GCS, workers, ...)."""
    found = []
    for pid in subprocess.run(["ip", "netns", "pids", hosts.namespaces[i]], capture_output=True,
                              text=True).stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(part in cmdline for part in ("raylet", "gcs_server", "ray::", "/ray/", "ray.scripts.scripts")):
            found.append(cmdline[:120])
    return found


def node_venv(path: Path) -> None:
    """A node's Python: a fresh venv that sees this venv's packages (torch, ray, ... through a .pth file) but not
    its dvp, so that the cluster YAML's own set-up commands must install dvp on the node."""
    import sysconfig
    subprocess.run(["python3", "-m", "venv", str(path)], check=True, timeout=120)
    subprocess.run([str(path / "bin/pip"), "uninstall", "-q", "-y", "setuptools"], check=True, timeout=120)  # ours
    site = subprocess.run([str(path / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dvp_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_ray_up_on_a_head_and_a_worker_host_runs_a_sweep_on_both_with_token_auth_and_ray_down_clears_both(
        short: Path) -> None:
    """From node2 (the user's machine): `ray get-auth-token --generate`, then `ray up cluster/local.yaml` with
    head_ip node0 and worker_ips [node1] over SSH (an sshd on each host): file_mounts ship dvp's sources and the
    token to each node, setup_commands `pip install -e` them into each node's own venv, each node's Ray starts
    with token auth. `ray submit ... sweeps/sweep.py -- sweep=digits_smoke ray.address=auto` runs the sweep with
    the shipped copy once both nodes are up (ray.nodes=2: the head's autoscaler starts the worker after `ray
    up` returns), every trial's two workers on both hosts; while it runs a client without the token is
    refused. The results and report are where the sweep's storage says (a folder both hosts share, as NFS);
    `ray down` (ray stop on the head; the worker's Ray ends once it loses the head's GCS) leaves no Ray process
    on either host."""
    import yaml
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    # the head's autoscaler runs `ssh -i ~/ray_bootstrap_key.pem`: ssh takes ~ from the passwd entry (/root),
    # not from HOME (each host's own home here), so that path points at the head's copy while the test runs
    bootstrap_key = Path(pwd.getpwuid(os.getuid()).pw_dir) / "ray_bootstrap_key.pem"
    if bootstrap_key.exists() or bootstrap_key.is_symlink():
        pytest.fail(f"{bootstrap_key} exists (a real cluster's?); the test needs that path: move it away")
    ray_tmp = short / "rt"                                  # node-local on each host, as /tmp/ray is
    with Hosts(short, 3, local=(ray_tmp,)) as hosts, hosts.sshd() as key:
        homes = [short / f"{name}-home" for name in hosts.names]
        bootstrap_key.symlink_to(homes[0] / "ray_bootstrap_key.pem")
        for i in range(2):                                  # the nodes: their own venv, shell and Ray folder
            (homes[i] / "bin").mkdir(parents=True, exist_ok=True)
            node_venv(short / f"venv{i}")
            (homes[i] / ".bashrc").write_text(BASHRC.format(home=homes[i], venv=short / f"venv{i}",
                                                            ray_tmp=ray_tmp, ext=ext))
            (homes[i] / ".profile").write_text(". ~/.bashrc\n")
            (homes[i] / "bin/ray").write_text(RAY_WRAPPER.format(venv=short / f"venv{i}", stop=STOP_HERE))
            (homes[i] / "bin/ray").chmod(0o755)
        config = yaml.safe_load((ROOT / "cluster/local.yaml").read_text())
        for name in ("head_start_ray_commands", "worker_start_ray_commands"):   # one CPU a node: 1 worker each
            config[name] = [c.replace("ray start", "ray start --num-cpus=1") for c in config[name]]
        config.update(cluster_name="dvptest", max_workers=1,
                      provider={"type": "local", "head_ip": hosts.ips[0], "worker_ips": [hosts.ips[1]]},
                      auth={"ssh_user": "root", "ssh_private_key": str(key)})
        (short / "cluster.yaml").write_text(yaml.safe_dump(config))
        client = {"HOME": str(homes[2]), "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}

        def ray(*args: str, timeout: float) -> subprocess.CompletedProcess:
            done = hosts.run(2, [*RAY, *args], timeout=timeout, env=client, cwd=ROOT)
            print(f"ray {args[0]}: exit {done.returncode}")
            return done
        assert ray("get-auth-token", "--generate", timeout=60).returncode == 0
        token = homes[2] / ".ray/auth_token"
        token.chmod(0o644)                      # as Ray writes it under umask 022: a user who skipped the chmod
        try:
            up = ray("up", "-y", "--no-config-cache", "--disable-usage-stats", str(short / "cluster.yaml"),
                     timeout=900)
            out = up.stdout + up.stderr
            assert up.returncode == 0 and "Ray runtime started" in out, out[-6000:]
            assert ray_on_host(hosts, 0), "no Ray on the head after ray up"
            wait_for(lambda: ray_on_host(hosts, 1), 600, "the worker node (the head's autoscaler starts it)")
            for i in range(2):      # the token shipped (node1's: before its Ray started), 0600 although the
                                    # user's is 0644 (the YAML's setup_commands)
                shipped = homes[i] / ".ray/auth_token"
                assert shipped.read_text() == token.read_text() and shipped.stat().st_mode & 0o777 == 0o600
            submit = hosts.popen(2, [*RAY, "submit", "--no-config-cache", str(short / "cluster.yaml"),
                                     "sweeps/sweep.py", "--", "sweep=digits_smoke", "ray.address=auto", "ray.nodes=2",
                                     f"storage={short / 'sweeps'}"],
                                 short / "submit.log", env=client, cwd=ROOT)
            folder = short / "sweeps/digits_smoke"
            wait_for(lambda: list(folder.glob("trials/*/checkpoint_*")) or submit.poll() is not None, 600,
                     "the sweep's first checkpoint")
            check_token_auth(hosts, 2, f"{hosts.ips[0]}:6379", token, short)
            assert submit.wait(timeout=900) == 0, (short / "submit.log").read_text()[-6000:]
        finally:
            down = ray("down", "-y", str(short / "cluster.yaml"), timeout=300)
            try:        # ray down stops the head's Ray; the worker's stops itself once the head's GCS is gone
                wait_for(lambda: not ray_on_host(hosts, 0) and not ray_on_host(hosts, 1), 60, "Ray to end")
            except AssertionError:
                pass
            left = [ray_on_host(hosts, i) for i in range(2)]
            bootstrap_key.unlink()
    out = (short / "submit.log").read_text()
    assert down.returncode == 0, (down.stdout + down.stderr)[-4000:]
    assert left == [[], []], f"ray down left Ray processes: {left}"
    for i in range(2):                                      # each node got the package from the YAML
        assert (homes[i] / "dvp-src/dvp/train/loop.py").read_bytes() == (ROOT / "dvp/train/loop.py").read_bytes()
    assert f"from {homes[0]}/dvp-src/dvp," in out, out[-6000:]
    rows = check_report(folder, folder / "runs", [0, 1])
    for row in rows:
        hosts_seen = {r["hosts"] for r in reported(folder / f"trial_{row['trial_id']}")}
        assert hosts_seen <= {"node0,node1", "node1,node0"} and hosts_seen, hosts_seen    # both hosts
