"""`python -m wdx.deploy`: faster-whisper with the domain token (wdx.deploy.faster_whisper)."""

import sys

from wdx.deploy.faster_whisper import main

if __name__ == "__main__":
    sys.exit(main())
