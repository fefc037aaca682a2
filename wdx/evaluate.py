"""`python -m wdx.evaluate`, the command README documents: it runs wdx.scoring.evaluate."""

import sys

from wdx.scoring.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
