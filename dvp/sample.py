"""`python -m dvp.sample ...`: the dvp-sample command (dvp.cli.sample), under the name docs/training.md documents."""
import sys

from dvp.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
