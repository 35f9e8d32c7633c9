"""``python -m distbelief``: the same as the ``distbelief`` command."""

from .cli import entry

entry()
