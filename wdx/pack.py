"""`python -m wdx.pack`, the command README documents: it runs wdx.data.pack."""

import sys

from wdx.data.pack import main

if __name__ == "__main__":
    sys.exit(main())
