"""`python -m vlmforge.bench` (`make bench`)."""

import sys

from vlmforge.bench.run import main
from vlmforge.core.errors import VlmforgeError

try:
    code = main()
except VlmforgeError as err:  # the user's mistake: what, where, the fix; no traceback
    print(err.render(), file=sys.stderr)
    code = 2
sys.exit(code)
