"""Sweeps with Ray Tune: the sweep file (`spec`), the per-trial Tune driver and its Ray Train workers
(`driver`, `worker`), the `dvp-sweep` command (`sweep`) and the report (`report`)."""
