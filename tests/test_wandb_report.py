"""`dvp-report SWEEP_DIR wandb=true`: what reaches the wandb server (the trials' run summaries and the Report's
spec), and its failures (one `error:` line, exit 2, the offline report files intact).

The wandb server cannot run on this machine, so `StandIn` stands in for it: a stdlib HTTP server on 127.0.0.1
(WANDB_BASE_URL, a dummy 40-character WANDB_API_KEY) that answers the GraphQL operations wandb.Api(), Api.runs,
a run summary update and wandb_workspaces' Report.save() send, as the real server's schema has them, and records
what it received: the tests assert on that. The real wandb client (wandb-core) and wandb_workspaces make the
requests.

The sweep folder is sweep.yaml + the trials' dvp run dirs (metrics.jsonl, stop.json); the trial list that Tune's
experiment state holds (Ray's own format, written by a real sweep: tests/test_sweep.py) is patched in.
"""
from __future__ import annotations

import csv
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_report import _error

from dvp.cli.report import main
from dvp.tune import trials
from dvp.tune.spec import find_sweep

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.PydanticDeprecatedSince20")   # wandb_workspaces' own
ENTITY, PROJECT, NAME = "dvp-team", "dvp-test", "wr_sweep"
TRIALS = [  # (trial id, Tune status, Tune config, validations (nelbo, au/0, au/1) per epoch or None, stop.json)
    ("wr_00000", "TERMINATED", {"arm": {"experiment": "digits/dvp_vae", "model.ctx_size": 2},
                                "space": {"model.latent_scales": [1]}}, [(40.0, 0.5, None), (30.0, 0.75, None)], True),
    ("wr_00001", "TERMINATED", {"arm": {"experiment": "digits/vampprior", "model.num_pseudo": 5},
                                "space": {"model.latent_scales": [2, 2]}}, [(28.0, 1.0, 0.25), (29.0, 1.0, 0.5)],
     False),                                                        # stopped early; its best is not its last
    ("wr_00002", "PENDING", {"arm": {"experiment": "digits/dvp_vae", "model.ctx_size": 4},
                             "space": {"model.latent_scales": [2, 2]}}, None, False),
]


class StandIn:
    """The wandb server's GraphQL endpoint for the operations dvp-report's publishing sends; `received` holds
    (operation name, variables) in order. `runs`: the group's runs (trial id -> summary); `fault`: None, an HTTP
    status to answer everything with, or "no project"."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.runs = {"wr_00000": {"val/nelbo": 30.0}, "wr_00001": {"val/nelbo": 29.0}, "other_run": {}}
        self.fault: int | str | None = None
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/graphql":             # wandb-core's telemetry
                    return self._send(200, {})
                query = json.loads(body)
                operation = re.search(r"(?:query|mutation)\s+(\w+)", query["query"]).group(1)
                stand_in.received.append((operation, query.get("variables") or {}))
                if isinstance(stand_in.fault, int):
                    return self._send(stand_in.fault, {"errors": [{"message": "permission denied"}]})
                data = stand_in.answer(operation, query.get("variables") or {})
                if data is None:
                    return self._send(400, {"errors": [{"message": f"stand-in: unexpected operation {operation}"}]})
                self._send(200, {"data": data})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                text = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _run(self, name: str) -> dict[str, Any]:
        return {"id": f"storage-{name}", "name": name, "displayName": name, "group": NAME, "state": "finished",
                "tags": [], "sweepName": None, "jobType": None, "commit": None, "readOnly": False,
                "createdAt": "2025-01-01T00:00:00", "heartbeatAt": "2025-01-01T00:10:00", "description": None,
                "notes": None, "systemMetrics": "{}", "summaryMetrics": json.dumps(self.runs[name]),
                "historyLineCount": 2, "user": {"name": "u", "username": "u"}, "historyKeys": None,
                "config": "{}", "projectId": "7"}

    def answer(self, operation: str, variables: dict[str, Any]) -> dict[str, Any] | None:
        project = {"__typename": "Project", "id": "UHJvamVjdDox", "name": PROJECT, "entityName": ENTITY,
                   "createdAt": "2025-01-01T00:00:00", "isBenchmark": False, "user": None}
        if operation in ("Viewer", "GetDefaultEntity"):
            return {"viewer": {"id": "VXNlcjox", "entity": ENTITY, "username": "u", "email": "u@example.com",
                               "flags": "{}", "teams": {"edges": []}}}
        if operation == "Runs":
            if self.fault == "no project" or (variables["entity"], variables["project"]) != (ENTITY, PROJECT):
                return {"project": None}
            edges = [{"node": self._run(name), "cursor": name} for name in self.runs]
            return {"project": {"internalId": "7", "runCount": len(edges), "readOnly": False,
                                "runs": {"edges": edges, "pageInfo": {"endCursor": None, "hasNextPage": False}}}}
        if operation == "UpsertBucket":
            return {"upsertBucket": {"bucket": {"id": variables["id"]}}}
        if operation == "ProjectInternalId":
            return {"project": {"id": project["id"], "internalId": "7"}}
        if operation == "GetProjects":
            return {"models": {"pageInfo": {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False},
                               "edges": [{"node": project}]}}
        if operation == "upsertView":
            return {"upsertView": {"inserted": True, "view": {
                "id": "VmlldzoxMjM0", "type": variables["type"], "name": variables["name"],
                "displayName": variables["displayName"], "description": variables["description"],
                "project": {"id": project["id"], "name": variables["projectName"],
                            "entityName": variables["entityName"]},
                "spec": variables["spec"], "updatedAt": "2025-01-01T00:00:00"}}}
        return None

    def sent(self, operation: str) -> list[dict[str, Any]]:
        return [v for op, v in self.received if op == operation]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """The stand-in server, with wandb pointed at it (a dummy key) and wandb's own files kept out of home."""
    stand_in = StandIn()
    home = tmp_path_factory.mktemp("wandb_home")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", stand_in.url)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


@pytest.fixture
def sweep_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sweep folder of TRIALS logged online to ENTITY/PROJECT (the CI sweep's file, smaller)."""
    raw = yaml.safe_load(find_sweep("digits_depth_pseudo").read_text())
    raw.update(name=NAME, experiments={"digits/dvp_vae": {"model.ctx_size": [2, 4]},
                                       "digits/vampprior": {"model.num_pseudo": [5]}},
               wandb={"project": PROJECT, "entity": ENTITY, "mode": "online"})
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for trial_id, _, _, validations, stopped in TRIALS:
        if validations is None:
            continue
        run = folder / "runs" / trial_id
        run.mkdir(parents=True)
        records = [{"split": "val", "step": 10 * (e + 1), "epoch": e, "nelbo": nelbo, "loss": nelbo / 50, "au": au0,
                    "au/0": au0, **({"au/1": au1} if au1 is not None else {}), "time": 1.0 + e}
                   for e, (nelbo, au0, au1) in enumerate(validations)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if stopped:
            (run / "stop.json").write_text("{}")
    monkeypatch.setattr(trials, "_tune_trials", lambda d: [(t, s, c) for t, s, c, _, _ in TRIALS])
    return folder


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def test_report_published_to_the_sweeps_group(sweep_dir: Path, server: StandIn,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep_dir), "wandb=true"]) == 0
    out = capsys.readouterr().out
    rows = _rows(sweep_dir / "report" / "trials.csv")
    assert (sweep_dir / "report" / "learning_curves.png").is_file()

    # the group's runs, listed once, get the report's numbers in their summaries (not the pending trial, not a
    # run of the group that is no trial of the folder); the summary they had is kept
    runs_query, = server.sent("Runs")
    assert (runs_query["entity"], runs_query["project"], json.loads(runs_query["filters"])) == (
        ENTITY, PROJECT, {"group": NAME})
    summaries = {v["id"]: json.loads(v["summaryMetrics"]) for v in server.sent("UpsertBucket")}
    assert set(summaries) == {"storage-wr_00000", "storage-wr_00001"}
    early = summaries["storage-wr_00001"]
    assert early["val/nelbo"] == 29.0                          # the last validation, as wandb logged it
    assert early["report/best"] == 28.0 and early["report/best_epoch"] == 1     # the best one, as the table
    assert early["report/params"] == int(rows["wr_00001"]["params"]) > 0
    assert (early["report/depth"], early["report/pseudo_inputs"], early["report/stopped_early"]) == (4, 5, True)
    assert (early["report/au/0"], early["report/au/1"]) == (1.0, 0.25)
    done = summaries["storage-wr_00000"]
    assert (done["report/best"], done["report/depth"], done["report/pseudo_inputs"]) == (30.0, 1, 2)
    assert done["report/stopped_early"] is False and "report/au/1" not in done and "report/test_nll" not in done

    # the report: title, the markdown (best trial's reproduce command, table), panels over the sweep's group
    view, = server.sent("upsertView")
    assert (view["entityName"], view["projectName"], view["displayName"], view["type"]) == (
        ENTITY, PROJECT, f"Sweep {NAME}", "runs")
    assert view["description"] == yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["description"]
    blocks = json.loads(view["spec"])["blocks"]
    text, = [b["content"] for b in blocks if b["type"] == "markdown-block"]
    assert f"- best: trial wr_00001 (digits/vampprior), val/nelbo 28 at epoch 1\n\n  `{rows['wr_00001']['command']}`" \
        in text
    assert rows["wr_00001"]["command"].startswith("dvp-train experiment=digits/vampprior ")
    assert "| trial    | family" in text and not text.startswith("# Sweep")
    grid, = [b["metadata"] for b in blocks if b["type"] == "panel-grid"]
    runset, = grid["runSets"]
    assert runset["project"] == {"name": PROJECT, "entityName": ENTITY, "id": "7"}
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=", "value": NAME,
                                             "disabled": False}]
    assert runset["sort"]["keys"] == [{"key": {"section": "summary", "name": "report/best"}, "ascending": True}]
    panels = {p["viewType"]: p["config"] for p in grid["panelBankSectionConfig"]["panels"]}
    curves = panels["Run History Line Plot"]
    assert (curves["xAxis"], curves["metrics"]) == ("epoch", ["val/nelbo"])
    assert [c["accessor"] for c in panels["Parallel Coordinates Plot"]["columns"]] == [
        "config:arm.value.experiment", "config:arm.value.model.ctx_size", "config:arm.value.model.num_pseudo",
        "config:space.value.model.latent_scales", "summary:report/depth", "summary:report/pseudo_inputs",
        "summary:report/params", "summary:report/best"]
    scatter = panels["Scatter Plot"]
    assert (scatter["xAxis"], scatter["yAxis"]) == ("summary:report/params", "summary:report/best")
    assert panels["Bar Chart"]["metrics"] == ["summary_metrics.report/au/0", "summary_metrics.report/au/1"]

    url = f"{server.url}/{ENTITY}/{PROJECT}/reports/Sweep-{NAME}--VmlldzoxMjM0"
    assert f"wandb report (2 of 3 trials' runs): {url}" in out.splitlines()


def test_wandb_false_never_touches_the_network(sweep_dir: Path, server: StandIn) -> None:
    assert main([str(sweep_dir), "wandb=false"]) == 0              # the sweep logged online: wandb=true by default
    assert (sweep_dir / "report" / "trials.md").is_file() and server.received == []


def test_no_api_key_fails_before_anything(sweep_dir: Path, server: StandIn, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep_dir), "wandb=false"]) == 0
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (sweep_dir / "report").iterdir()}
    capsys.readouterr()
    monkeypatch.delenv("WANDB_API_KEY")
    line = _error(capsys, [str(sweep_dir)])                        # wandb=true: the sweep logged online
    assert f"no wandb API key for {server.url}" in line and "wandb login" in line and "wandb=false" in line
    assert server.received == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (sweep_dir / "report").iterdir()} == files


@pytest.mark.parametrize("fault, fragments", [
    (401, ["answered: Failed to verify credentials", "permission denied", "wandb login --relogin"]),
    ("no project", [f"project {ENTITY}/{PROJECT} not found", "set wandb.entity and wandb.project in"]),
    ("no runs", [f"no run of the sweep's trials in group {NAME}", "wandb sync ", "/trial_*/wandb/offline-run-*"]),
])
def test_a_server_failure_is_one_line_after_the_offline_report(
        tmp_path: Path, sweep_dir: Path, server: StandIn, capsys: pytest.CaptureFixture[str], fault: int | str,
        fragments: list[str]) -> None:
    assert main([str(sweep_dir), "wandb=false", f"out={tmp_path / 'offline'}"]) == 0
    capsys.readouterr()
    if fault == "no runs":                                         # the sweep logged offline, never synced
        server.runs = {}
    else:
        server.fault = fault
    line = _error(capsys, [str(sweep_dir), "wandb=true"])
    assert line.startswith(f"error: wandb report of sweep {NAME} not published: ")
    assert all(f in line for f in fragments), line
    assert line.endswith(f"(the offline report in {sweep_dir / 'report'} is written)")
    assert server.sent("upsertView") == []
    offline = tmp_path / "offline"
    assert sorted(p.name for p in (sweep_dir / "report").iterdir()) == sorted(p.name for p in offline.iterdir())
    for name in ("trials.csv", "trials.md"):
        assert (sweep_dir / "report" / name).read_bytes() == (offline / name).read_bytes()


def test_wandb_needs_a_sweep_that_logged_to_wandb(sweep_dir: Path, server: StandIn,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    raw["wandb"]["mode"] = "disabled"
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    line = _error(capsys, [str(sweep_dir), "wandb=true"])
    assert "logged nothing to wandb (wandb.mode=disabled in" in line and "give wandb=false" in line
    assert not (sweep_dir / "report").exists() and server.received == []
    assert main([str(sweep_dir)]) == 0 and server.received == []   # default: no wandb report, and no error


def test_wandb_offline_here_fails_before_anything(sweep_dir: Path, server: StandIn, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from wandb.sdk import wandb_setup
    monkeypatch.setattr(wandb_setup.singleton().settings, "mode", "offline")     # as WANDB_MODE=offline does
    line = _error(capsys, [str(sweep_dir), "wandb=true"])
    assert "wandb is offline here" in line and "unset WANDB_MODE" in line and "wandb=false" in line
    assert not (sweep_dir / "report").exists() and server.received == []
