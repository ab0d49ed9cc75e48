"""Evaluation as a library: the sharded ELBO and active units of a split, the test set's IS-NLL, bpd and per-layer
KL (sharded), and the progress of a long pass (progress). The `dvp-eval` command is dvp.cli.eval.

Imports: dvp.core, dvp.parallel, dvp.data, dvp.model.
"""
