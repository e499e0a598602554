"""`python -m hyperjax` runs the command line."""

from hyperjax.cli import main

main()
