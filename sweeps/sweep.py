"""The script `ray submit` ships: runs `dvp-sweep` with the given arguments (dvp must be installed on the head
node, as cluster/*.yaml do through file_mounts and setup_commands).

    python sweeps/sweep.py sweep=digits_depth_pseudo
    ray submit CLUSTER.yaml sweeps/sweep.py -- sweep=mnist_depth_pseudo ray.address=auto
"""
import sys

from dvp.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
