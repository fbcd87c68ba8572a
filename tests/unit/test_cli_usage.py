"""``ember usage --since``: durations and dates become wall-clock seconds; anything else is refused clearly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ember.cli.usage import parse_since

NOW = 1_764_800_000.0


@pytest.mark.parametrize(
    ("text", "back_s"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172_800), ("1.5h", 5400)]
)
def test_durations_count_back_from_now(text: str, back_s: float) -> None:
    assert parse_since(text, NOW) == NOW - back_s


def test_an_iso_date_with_a_zone_is_that_instant() -> None:
    expected = datetime(2026, 12, 4, 9, 0, tzinfo=UTC).timestamp()
    assert parse_since("2026-12-04T09:00+00:00", NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "5 weeks", "-1h", ""])
def test_other_words_are_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="30m, 1h or 2d"):
        parse_since(text, NOW)
