"""`python -m wdx.inspect`, the command README documents: it runs wdx.data.inspect."""

import sys

from wdx.data.inspect import main

if __name__ == "__main__":
    sys.exit(main())
