"""Layout tokens: how a prompt is laid out, independent of what it says.

Tasks differ in form as much as in topic: ``Title: ...\\nText: ...`` records, ``sentence 1:/sentence 2:`` pairs,
bare questions with literal ``\\n`` escapes, one-line snippets. Word and character n-grams drown such signals
among thousands of content features; these few tokens carry them on their own (weighted) block.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"^([A-Za-z][A-Za-z ]{0,19}\d?):")
MAX_LINES = 6


def layout_tokens(text: str) -> list[str]:
    """Tokens for line count, each leading line's opening and ``key:`` label, first/last characters, and
    a few telltales (escaped newlines, an early question mark, double spaces)."""
    lines = text.split("\n")
    toks = [f"nl:{min(len(lines) - 1, MAX_LINES)}", f"start:{text[:3]}", f"end:{text[-1:]!r}"]
    for line in lines[:MAX_LINES]:
        toks.append("lp:" + line[:7].replace(" ", "_"))
        m = _KEY.match(line)
        if m:
            toks.append("key:" + m.group(1).lower())
    if "\\n" in text:
        toks.append("escnl")
    if "?" in text[:200]:
        toks.append("qearly")
    if "  " in text:
        toks.append("dblspace")
    return toks
