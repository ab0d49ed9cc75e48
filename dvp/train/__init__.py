"""Training: the engines (the only owners of parameters, optimizer state and EMA: engine the interface and the
one training step, engine_torch the single-process reference, engine_deepspeed ZeRO 0-3, engines which one a run
uses), optim (Adamax + clip + skip + EMA), the loop, checkpointer (a run's checkpoints: saving, the commit point,
resuming at any world size), checkpoint (the file: atomic, weights_only loading), rng (generator states in
checkpoints), logger (metrics, grids, wandb), curves (a run's learning curves) and config (the run config checked
in full: schema, data and model).

`python -m dvp.train` is the `dvp-train` command (dvp.cli.train), for launchers that take a module.

Imports: dvp.core, dvp.parallel, dvp.data, dvp.model, dvp.evaluate.
"""
