"""`dvp-report SWEEP_DIR wandb=true`: the sweep's report as a W&B Report over its wandb group, with the official
`wandb-workspaces` Reports API.

    check_ready(spec)                                  # no network: wandb not off here, an API key for the server
    url, runs = publish(spec, rows, body, out)         # body: trials.md without its title (report.markdown_body)

Each trial logged one wandb run (`WandbTrials` in dvp/tune/driver.py): id = name = the trial id, group = the
sweep's name, in sweep.yaml's wandb.entity / wandb.project; history `val/<key>` and `epoch` (epochs finished) at
every validation; config `arm` (`experiment`: the family, and the family's own axes), `space` (the shared axes)
and `overrides`. What dvp-report works out from the sweep folder (best metric over the validations, parameter
count, depth, pseudo-inputs, test NLL) is not in those runs, so `publish` first writes it into each run's summary
as `report/<key>` (SUMMARY_KEYS; `report/au/<layer>` for the active units), then saves the report "Sweep <name>":
    Markdown    trials.md without its title: metric, trial counts, the best trial and its reproduce command, the
                table, every trial's reproduce command
    PanelGrid   over the runs whose group is the sweep's name (runs table: family, axes, report/ columns, best
                first), the offline plots' counterparts:
                  learning curves   the metric against epoch, every run
                  model size        report/best against report/params (log x over a 10x spread)
                  axes              parallel coordinates: family and every axis as logged (config arm.<key> or
                                    space.<key>), report/depth, report/pseudo_inputs, report/params, report/best
                  active units      report/au/<layer> per run (at the best validation)
Every call saves a new report. A failure is one line naming the cause and the fix (ConfigError before any
network work, PublishError after); the offline report files are not touched here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb
import wandb_workspaces.reports.v2 as wr
from wandb.env import get_base_url
from wandb.sdk import wandb_setup
from wandb.sdk.lib import wbauth
from wandb.sdk.lib.service.service_connection import WandbApiFailedError
from wandb_workspaces import expr

from dvp.core.errors import ConfigError, PublishError, one_line
from dvp.tune.spec import SweepSpec
from dvp.tune.trials import axes

SUMMARY_KEYS = ("best", "best_epoch", "params", "depth", "pseudo_inputs", "val_bpd", "au", "test_nll",
                "stopped_early")
"""Row keys (trials.ROW_KEYS) written into each trial's run summary as report/<key> (None left out)."""
PANEL_WIDTH = 24
"""A panel grid's width in layout units."""


def server_url() -> str:
    """The wandb server that wandb.Api() talks to (WANDB_BASE_URL, else wandb's settings)."""
    return get_base_url(wandb_setup.singleton().settings.base_url)


def check_ready(spec: SweepSpec) -> None:
    """What can be checked before any network work: the sweep logged to wandb, wandb is not switched off here
    (WANDB_MODE, `wandb offline`) and there is an API key for the server."""
    if spec.wandb["mode"] == "disabled":
        raise ConfigError(f"sweep {spec.name} logged nothing to wandb (wandb.mode=disabled in {spec.path}): there is "
                          "no wandb report to publish; give wandb=false")
    mode = wandb_setup.singleton().settings.mode
    if mode in ("offline", "dryrun", "disabled"):
        raise ConfigError(f"wandb is {mode} here (WANDB_MODE or `wandb offline`) but wandb=true publishes to the "
                          "server: unset WANDB_MODE or run `wandb online`, or give wandb=false")
    url = server_url()
    try:
        auth = wbauth.authenticate_session(host=url, source="dvp-report", prompt=False, update_session=False)
    except wandb.errors.AuthenticationError as e:
        raise ConfigError(f"wandb credentials for {url}: {one_line(e)}; set a valid WANDB_API_KEY or run "
                          "`wandb login --relogin`, or give wandb=false") from None
    if auth is None:
        raise ConfigError(f"no wandb API key for {url}: run `wandb login` (or set WANDB_API_KEY), or give "
                          "wandb=false for the offline report only")


def run_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What a trial's run summary gets: report/<key> for SUMMARY_KEYS, report/au/<layer>."""
    values = {f"report/{k}": row[k] for k in SUMMARY_KEYS if row[k] is not None}
    values.update({f"report/au/{layer}": value for layer, value in enumerate(row["au_layers"])})
    return values


def config_keys(spec: SweepSpec) -> list[str]:
    """The run config keys of the family and the sweep's axes, as WandbTrials logs them: arm.experiment,
    arm.<family axis>, space.<shared axis>."""
    return ["arm.experiment", *(f"{'space' if k in spec.space else 'arm'}.{k}" for k in axes(spec))]


def _column(key: str) -> str:
    """A runs-table column of a (nested) config key: 'arm.model.ctx_size' -> 'config:arm.value.model.ctx_size'."""
    top, dot, rest = key.partition(".")
    return f"config:{top}.value{dot}{rest}"


def build_report(spec: SweepSpec, rows: list[dict[str, Any]], body: str, entity: str) -> wr.Report:
    """The report (module docstring) of the sweep's group in entity / sweep.yaml's wandb.project, unsaved."""
    project, metric, width = spec.wandb["project"], spec.metric, PANEL_WIDTH
    best = wr.SummaryMetric("report/best")
    runset = wr.Runset(
        entity=entity, project=project, name=spec.name, filters=expr.And(expr.Metric("Group") == spec.name),
        order=[wr.OrderBy(best, ascending=spec.mode == "min")],
        visible_columns=[*(_column(k) for k in config_keys(spec)), *(f"summary:report/{k}" for k in SUMMARY_KEYS)])
    params = [r["params"] for r in rows if r["best"] is not None and r["params"]]
    panels = [
        wr.LinePlot(title=f"{metric} per epoch, every trial", x="epoch", y=[metric], title_x="epochs finished",
                    title_y=metric, layout=wr.Layout(x=0, y=0, w=width // 2, h=8)),
        wr.ScatterPlot(title=f"best {metric} vs model size", x=wr.SummaryMetric("report/params"), y=best,
                       log_x=bool(params) and max(params) > 10 * min(params),
                       layout=wr.Layout(x=width // 2, y=0, w=width // 2, h=8)),
        wr.ParallelCoordinatesPlot(
            title=f"best {metric} over the axes",
            columns=[*(wr.ParallelCoordinatesPlotColumn(wr.Config(k)) for k in config_keys(spec)),
                     *(wr.ParallelCoordinatesPlotColumn(wr.SummaryMetric(f"report/{k}"))
                       for k in ("depth", "pseudo_inputs", "params", "best"))],
            layout=wr.Layout(x=0, y=8, w=width, h=8))]
    layers = max((len(r["au_layers"]) for r in rows), default=0)
    if layers:
        panels.append(wr.BarPlot(title="active-unit fraction per latent layer at each trial's best validation",
                                 metrics=[wr.SummaryMetric(f"report/au/{layer}") for layer in range(layers)],
                                 orientation="v", layout=wr.Layout(x=0, y=16, w=width, h=8)))
    return wr.Report(project=project, entity=entity, title=f"Sweep {spec.name}"[:128],
                     description=spec.raw.get("description") or "",
                     blocks=[wr.MarkdownBlock(text=body), wr.PanelGrid(runsets=[runset], panels=panels)])


def publish(spec: SweepSpec, rows: list[dict[str, Any]], body: str, out: Path) -> tuple[str, int]:
    """Write the report's values into the summaries of the group's runs and save the report; returns its URL and
    how many trials' runs were found. `out` (the offline report) is only named in errors."""
    url, project = server_url(), spec.wandb["project"]

    def failure(cause: str, fix: str) -> PublishError:
        return PublishError(f"wandb report of sweep {spec.name} not published: {cause}; {fix} (the offline report "
                            f"in {out} is written)")
    try:
        api = wandb.Api()
        entity = spec.wandb["entity"] or api.default_entity
        try:
            runs = {r.id: r for r in api.runs(f"{entity}/{project}", filters={"group": spec.name}, lazy=False)}
        except ValueError as e:
            if not str(e).startswith("Could not find project"):      # what wandb's Runs raises for no project
                raise
            raise failure(f"project {entity}/{project} not found on {url}",
                          f"set wandb.entity and wandb.project in {spec.path} to where the trials logged") from None
        found = [r for r in rows if r["trial_id"] in runs]
        if not found:
            raise failure(f"no run of the sweep's trials in group {spec.name} of {entity}/{project} on {url}",
                          f"if the sweep logged offline, upload it first: wandb sync {Path(spec.path).parent}/trial_*"
                          "/wandb/offline-run-*")
        for row in found:
            runs[row["trial_id"]].summary.update(run_summary(row))
        report = build_report(spec, rows, body, entity)
        report.save()
        return report.url, len(found)
    except (wandb.errors.Error, WandbApiFailedError) as e:
        raise failure(f"{url} answered: {one_line(e)[:300]}",
                      "check the API key (`wandb login --relogin` or WANDB_API_KEY), that the server is reachable "
                      f"and that {spec.path}'s wandb.entity / wandb.project are yours; then rerun with wandb=true"
                      ) from None
