"""`python -m vlmforge.cli ...`: the same entry point as the `vlmforge` script."""

import sys

from vlmforge.cli import main

sys.exit(main())
