"""``python -m vitq`` (and ``torchrun --nproc-per-node N -m vitq quantize ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
