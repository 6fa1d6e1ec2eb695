"""Text that is safe to show on an operator's terminal, whatever a webhook put in it.

A webhook can carry escape sequences (``ESC [2J`` clears the screen, ``ESC ]0;...BEL`` sets the window
title), bidi overrides that reorder what is shown, invisible characters and lone surrogates (which make
printing fail). Operator commands show every value they did not write themselves through these functions.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["safe_json", "safe_text"]


def _escape(ch: str) -> str:
    # Python's own spelling, so an operator can paste it into a string literal.
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe_text(text: str) -> str:
    """``text`` with each character that is not printable shown as ``\\x1b``, ``\\u202e``, ``\\ud800``.

    Not printable is what :meth:`str.isprintable` says: controls (C0, DEL, C1, CR, LF, TAB), format
    characters (bidi overrides, zero widths), surrogates, private use, unassigned characters and every
    separator but the space. The backslash becomes ``\\\\``, so an escape in the input cannot pass for one of
    ours: distinct texts stay distinct.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else _escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    # JSON has no escape above U+FFFF: a UTF-16 surrogate pair, as json.dumps(ensure_ascii=True) writes.
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def safe_json(data: Any, indent: int = 2) -> str:
    """``data`` as indented JSON that is still valid and whose every character outside line breaks prints.

    JSON's own escapes (``\\u001b``, ``\\u202e``, ``\\ud800``), not :func:`safe_text`'s, so the output
    parses back to ``data``; readable text such as Cyrillic is kept as it is.
    """
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    if text.isprintable():
        return text
    # json.dumps escapes C0 controls, quotes and backslashes inside strings; what is left unprintable is
    # either inside a string or one of the indent's line breaks.
    return "".join(ch if ch == "\n" or ch.isprintable() else _json_escape(ch) for ch in text)
