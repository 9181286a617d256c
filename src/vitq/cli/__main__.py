"""``python -m vitq.cli``."""

import sys

from . import main

sys.exit(main())
