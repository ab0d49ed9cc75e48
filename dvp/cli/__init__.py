"""The commands: argument parsing, user-facing errors and exit codes, and nothing else. common (--help, one-line
errors, signals, the launch context), train, eval, sample, info, sweep, report, curves, and runs (a run dir
named on the command line, loaded).

Imports: any layer of dvp; nothing imports dvp.cli except the `python -m` entry points.
"""
