"""Sweeps with Ray Tune: the sweep file (spec), the per-trial Tune driver and its Ray Train workers (driver,
worker), a sweep run to its end (sweep), a sweep folder read back as rows (trials), the report (report, plots,
wandb_report), node (what each process of the sweep's Ray job does first: its network interface) and ray_stop
(stop one Ray instance's processes on a node; `python -m dvp.tune.ray_stop`).
The `dvp-sweep` and `dvp-report` commands are dvp.cli.sweep and dvp.cli.report.

Imports: dvp.core, dvp.parallel, dvp.data, dvp.model, dvp.evaluate, dvp.train.
"""
