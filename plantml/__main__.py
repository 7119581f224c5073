"""``python -m plantml`` runs the command line."""

from plantml.cli import run

run()
