"""`python -m toxtests`: the same as the `toxtests` command."""

from toxtests.cli import entry_point

entry_point()
