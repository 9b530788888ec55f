"""User-facing configuration errors."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message always names the key as the user wrote it, shows the bad value and, when the
    valid values form a small set, lists them.
    """

    def __init__(self, key: str, value: Any, expected: str | Iterable[Any]) -> None:
        if not isinstance(expected, str):
            expected = "one of: " + ", ".join(repr(c) for c in expected)
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r} is invalid; expected {expected}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`ConfigError`."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, choices)
    return value


def check_positive(key: str, value: int | float, *, allow_zero: bool = False) -> int | float:
    """Return ``value`` if it is > 0 (or >= 0 with ``allow_zero``), else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (value == 0 and not allow_zero):
        raise ConfigError(key, value, "a finite number >= 0" if allow_zero else "a finite number > 0")
    return value


def check_positive_int(key: str, value: int | None, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an integer >= ``minimum`` (or None with ``allow_none``), else raise
    :class:`ConfigError`: the one integer validator."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(key, value, expected + (" or null" if allow_none else ""))
    return value
