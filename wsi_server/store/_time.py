"""UTC time helpers shared by the store modules."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` converted to UTC; a naive value is refused (its zone is unknown)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: give a timezone-aware time")
    return value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 text in UTC with a ``Z`` suffix, or None."""
    if value is None:
        return None
    return as_utc(value).isoformat().replace("+00:00", "Z")
