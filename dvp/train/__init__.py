"""Training: the engines (the only owners of parameters, optimizer state and EMA: engine the interface,
engine_torch the single-process reference, engine_deepspeed ZeRO 0-3, engines which one a run uses), optim
(Adamax + clip + skip + EMA), the loop, checkpoint (atomic, weights_only loading), logger (metrics, grids, wandb)
and curves (a run's learning curves); config (the run config checked in full: schema, data and model).

`python -m dvp.train` is the `dvp-train` command (dvp.cli.train), for launchers that take a module.

Imports: dvp.core, dvp.parallel, dvp.data, dvp.model, dvp.evaluate.
"""
