"""What counts as a blank text and as a valid label, in one place.

The service checks these in code and states them in its OpenAPI document as regular
expressions. Both must agree for every client, and regex dialects disagree on ``\\s``: Python's
counts the ASCII separators ``\\x1c``-``\\x1f`` as space, JSON Schema's (ECMA-262) does not. So
whitespace here is ECMA-262's list, spelled out character by character, which every dialect reads
the same way.
"""

from __future__ import annotations

import re

WHITESPACE = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
"""Unicode's control characters (category Cc)."""

TEXT_PATTERN = f"[^{WHITESPACE}]"
"""A text has at least one character that is not whitespace (search, not anchored)."""
LABEL_PATTERN = f"^[^{CONTROL}]*[^{WHITESPACE}{CONTROL}][^{CONTROL}]*$"
"""A label has a character that is not whitespace, and no control characters."""

_TEXT = re.compile(TEXT_PATTERN)
_CONTROL = re.compile(f"[{CONTROL}]")


def is_blank(text: str) -> bool:
    return _TEXT.search(text) is None


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None
