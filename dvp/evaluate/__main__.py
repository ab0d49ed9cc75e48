"""`python -m dvp.evaluate ...` (torchrun -m for a sharded IS-NLL): the dvp-eval command."""
import sys

from dvp.cli.eval import main

sys.exit(main())
