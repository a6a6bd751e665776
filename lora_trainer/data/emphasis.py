"""The WebUI's prompt emphasis syntax in captions: parse it (``data.weighted_captions``) or escape it (the default).

AUTOMATIC1111 reads ``(word)`` as ×1.1, ``[word]`` as ÷1.1, ``(word:1.3)`` as ×1.3, ``\\(`` as a literal
bracket and a separate ``BREAK`` as "start a new 75-token chunk". Booru-style tags such as
``hatsune miku (vocaloid)`` or ``[sketch]`` are plain text to the people who wrote them, so captions are
trained literally, as kohya's trainer does by default: in the WebUI they are escaped before its prompt
parser sees them. With ``weighted_captions`` the syntax is read, by the WebUI's parser in the WebUI and by
``parse_emphasis`` (the same rules) on the command line.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = -1.0  # the weight that marks a chunk break
# one token of the syntax: an escaped character, a lone backslash, an opening bracket, a ":weight)" closing,
# a closing bracket, a run of plain text, or a lone colon
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_SPECIAL = re.compile(r"[\\()\[\]]")
_BREAK_WORD = re.compile(r"\bBREAK\b")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``text`` → [(text, weight)] with runs of equal weight merged; a chunk break is ("BREAK", -1)."""
    parts: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _TOKEN.finditer(text):
        piece, number = m.group(0), m.group(1)
        weight = _number(number)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece in ("(", "["):
            opened[piece].append(len(parts))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), weight)
        elif piece == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif piece == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, chunk in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append(["BREAK", BREAK])
                parts.append([chunk, 1.0])
    for start in opened["("]:  # brackets left open apply to the end
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[list] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(list(part))
    return [(t, w) for t, w in merged]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:  # "(word:.)": no number
        return None


def escape_emphasis(text: str) -> str:
    """``text`` such that the WebUI's parser reads it as one literal run of weight 1.

    Brackets and backslashes get a backslash; a separate word ``BREAK`` becomes ``break`` (CLIP lowercases
    every prompt, so the tokens are the same, but the parser no longer starts a new chunk there).
    """
    return _BREAK_WORD.sub("break", _SPECIAL.sub(lambda m: "\\" + m.group(0), text))


def has_emphasis(text: str) -> bool:
    """Whether the WebUI's parser would read anything in ``text`` other than plain text of weight 1."""
    return parse_emphasis(text) != [(text, 1.0)]
