"""`python -m dvp.train ...` (torchrun -m, deepspeed --module, srun python -m): the dvp-train command."""
import sys

from dvp.cli.train import main

sys.exit(main())
