"""Distribution: where this process sits in the job and the random draws that make the model independent of it.

launch (the launcher's environment -> `LaunchEnv`: rank, world size, local rank, master address), context
(`init`: the process group, the device through DeepSpeed's accelerator, the collectives, every rank's host),
interface (the network interface toward the other hosts, for gloo and NCCL), noise (every random
draw as a function of the seed, the step and the global sample index; ranks take slices).

Imports: dvp.core.
"""
