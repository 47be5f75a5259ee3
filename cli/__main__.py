"""`python -m cli` runs the meshplan command line."""

from cli.main import entry

entry()
