"""What the tests use and are not tests: clusters (real Slurm and sshd daemons started as root, stopped by PID),
netns (hosts made of Linux network namespaces), dist_points and kill_points (dvp-train with a pause, a signal or a
SIGKILL at a chosen point: run as scripts), wandb_records (the records of an offline wandb run file)."""
