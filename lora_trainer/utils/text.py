"""Small text helpers for messages."""

from __future__ import annotations


def name_list(items, limit: int = 5) -> str:
    """``a, b, c and 4 more``: the first ``limit`` distinct items, in order."""
    items = list(dict.fromkeys(str(i) for i in items))
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
