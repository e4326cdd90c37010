"""``python -m autopar``: the command line, as the ``autopar`` script runs it
(:mod:`autopar.cli`)."""

import sys

from .cli import main

sys.exit(main())
