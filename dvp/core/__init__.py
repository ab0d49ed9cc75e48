"""The ground floor: what every layer may use and that knows nothing of models, data or processes.

errors (the user-facing error types, a leaf), schema (what each key of a commented defaults file may hold: the
run config's and the sweep file's), config (composition of defaults + experiment + overrides, and validation
before any compute), paths (output paths checked before compute, atomic writes), signals (SIGTERM /
SIGUSR1 / Ctrl-C as a clean stop), file_kind (what a bad file is), noise (every random draw as a function of the
seed, the step and the global sample index; ranks take slices, so the model does not depend on their number).

Imports: nothing of dvp.
"""
