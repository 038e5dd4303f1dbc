"""`python -m rlft ...`: the `rlft` command (what torchrun starts: torchrun ... -m rlft run RECIPE)."""

import sys

from rlft.cli import main

sys.exit(main())
