"""``python -m matryoshka.cli`` (e.g. under ``torchrun``) runs the ``mrl`` command line."""

import sys

from matryoshka.cli import main

sys.exit(main())
