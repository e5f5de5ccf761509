"""`python -m importer`: the same as `cdi-importer`."""

import sys

from importer.main import main

sys.exit(main())
