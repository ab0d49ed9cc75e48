"""dvp: Hierarchical VAEs with a Diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024) and their baselines.

The layers, lowest first; each folder's __init__ says what it owns and which layers it may import (checked by
tests/test_layout.py), so data flows one way: config -> data + model -> evaluation -> engine + loop -> sweeps ->
commands.

    core/      errors, config, paths, signals, file_kind, noise    imports nothing of dvp
    parallel/  launch environment, process group + device          core
    data/      datasets, batches                                   core
    model/     vae, pseudo_input, blocks, unet, diffusion, likelihoods, precision, objectives   core
    evaluate/  sharded ELBO / IS-NLL, progress                     core, parallel, data, model
    train/     engines, optim, loop, checkpoint, logger, curves    the layers above
    tune/      Ray Tune sweeps and their report                    the layers above
    cli/       the commands                                        any

`python -m dvp.train`, `python -m dvp.evaluate`, `python -m dvp.sample` and `python -m dvp.info` run the commands
(dvp/train/__main__.py, dvp/evaluate/__main__.py, dvp/sample.py, dvp/info.py: entry points, not layers).
"""
__version__ = "0.1.0"
