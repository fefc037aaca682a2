"""python -m wdx.demo OUT_DIR: what `make demo` runs (see wdx.demo.pipeline)."""

import sys

from wdx.demo.pipeline import main

sys.exit(main())
