"""Parallelism: where this process sits in the job, its device and the collectives.

launch (the launcher's environment -> `LaunchEnv`: rank, world size, local rank, master address), context
(`init`: the process group, the device through DeepSpeed's accelerator, the collectives, every rank's host),
interface (the network interface toward the other hosts, for gloo and NCCL). Not named `dist`: tools such as
ruff and common .gitignore templates skip any folder of that name as build output.

Imports: dvp.core.
"""
