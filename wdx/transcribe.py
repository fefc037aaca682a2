"""`python -m wdx.transcribe`, the command README documents: it runs wdx.scoring.transcribe."""

import sys

from wdx.scoring.transcribe import main

if __name__ == "__main__":
    sys.exit(main())
