"""``python -m hybridquant``: the command line, also as ``torchrun --nproc_per_node N -m hybridquant eval``."""

import sys

from hybridquant.cli import main

sys.exit(main())
