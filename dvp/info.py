"""`python -m dvp.info ...`: the dvp-info command (dvp.cli.info), kept under the name docs/training.md documents."""
import sys

from dvp.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
