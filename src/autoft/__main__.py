"""``python -m autoft`` runs the command line."""

import sys

from autoft.cli import main

sys.exit(main())
