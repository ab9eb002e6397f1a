"""`python -m kiln` is the `kiln` command (also what torchrun launches)."""

import sys

from kiln.cli import main

sys.exit(main())
