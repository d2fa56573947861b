"""``python -m fastfair``: the command line (see ``fastfair.cli``)."""
import sys

from .cli import main

sys.exit(main())
