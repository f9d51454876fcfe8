"""`python -m vlmforge.bench` (`make bench`)."""

import sys

from vlmforge.bench.run import main

sys.exit(main())
