"""`python -m wdx.study`, the command README documents: it runs wdx.scoring.study."""

import sys

from wdx.scoring.study import main

if __name__ == "__main__":
    sys.exit(main())
