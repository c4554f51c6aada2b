"""``python -m autoft`` runs the command line."""

from autoft.cli import run

run()
