"""``python -m ember.cli``: the ``ember`` command."""

from ember.cli.commands import main

main()
