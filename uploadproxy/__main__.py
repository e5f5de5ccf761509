"""`python -m uploadproxy`: the same as `cdi-uploadproxy`."""

import sys

from uploadproxy.main import main

sys.exit(main())
