"""`python -m dvp.info ...`: the dvp-info command (dvp.cli.info), kept under the name the README documents."""
import sys

from dvp.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
