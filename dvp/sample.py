"""`python -m dvp.sample ...`: the dvp-sample command (dvp.cli.sample), kept under the name the README documents."""
import sys

from dvp.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
