"""``ember ...``: the command line. Thin: parse, validate, call the library.

``commands``: the app and the top-level commands (deploy, ls, infer, logs, ...); ``serve``,
``store``, ``sim``, ``keys``, ``describe``: their command groups; ``common`` and ``progress``: what
they share (options, tables, error output, the deploy progress bar). ``python -m ember.cli`` runs
the app.
"""

from ember.cli.commands import absolute_source, app, curl_example, is_loopback, main

__all__ = ["absolute_source", "app", "curl_example", "is_loopback", "main"]
