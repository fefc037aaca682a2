"""`python -m wdx.export_ct2`, the command README documents: it runs wdx.deploy.export_ct2."""

import sys

from wdx.deploy.export_ct2 import main

if __name__ == "__main__":
    sys.exit(main())
