"""`python -m tachyon.data`: see tachyon.data.cli."""

import sys

from .cli import main

sys.exit(main())
