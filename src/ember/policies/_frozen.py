"""``evolve``: a changed copy of a frozen policy value, for the state folded in on every request."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def evolve(value: T, **changes: Any) -> T:
    """``value`` with ``changes``, like ``dataclasses.replace`` but without calling ``__init__``.

    ``replace`` re-runs ``__init__`` and ``__post_init__`` and sets each field through the frozen
    ``__setattr__``: several microseconds, paid once per batch and per idle period by the loops and
    by the simulator. Only for plain (not slotted) frozen dataclasses, and only with changes that
    keep the invariants ``__post_init__`` checks: the callers derive them from a valid value.
    """
    new = object.__new__(type(value))
    fields = new.__dict__
    fields.update(value.__dict__)
    fields.update(changes)
    return new
