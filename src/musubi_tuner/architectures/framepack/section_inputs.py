"""FramePack per-section prompts and images: `--prompt "0:a cat sits;;;2-3:a cat jumps;;;-1:a cat sleeps"`.

Syntax (the reference's): parts split on `;;;`, each `INDEX:text` where INDEX is a section (`2`), a range (`0-2`,
both ends included) or counted from the end (`-1` = the last section). Without `;;;` the whole string is section 0's.
Section 0 always has a value: when not given, the lowest non-negative index's (or, with only negative indices, the
lowest one's). A section uses its from-the-end entry first, then its own index, then section 0's.
"""

from __future__ import annotations

import re

from musubi_tuner.errors import UserError

SEPARATOR = ";;;"
_INDEX = re.compile(r"^(-?\d+)(?:-(\d+))?$")


def parse_section_strings(text: str | None, flag: str = "--prompt") -> dict[int, str]:
    """Section index -> text. A part whose prefix before `:` is not an index is section 0's text as a whole (the
    reference dropped the prefix, which cut a Windows drive letter or a prompt's `style:`)."""
    if text is None:
        return {}
    if SEPARATOR not in text:
        return {0: text}
    values: dict[int, str] = {}
    for part in text.split(SEPARATOR):
        if not part.strip():
            continue
        head, colon, body = part.partition(":")
        match = _INDEX.match(head.strip()) if colon else None
        if match is None:
            values[0] = part.strip()
            continue
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise UserError(f"{flag}: section range {head.strip()!r} ends before it starts; write it as START-END")
        for index in range(start, end + 1):
            values[index] = body.strip()
    if values and 0 not in values:
        non_negative = [i for i in values if i >= 0]
        values[0] = values[min(non_negative) if non_negative else min(values)]
    return values


def section_key(values: dict[int, object], section_index: int, section_index_from_last: int) -> int:
    """Which entry a section uses: counted from the end, else its own index, else section 0."""
    if section_index_from_last in values:
        return section_index_from_last
    if section_index in values:
        return section_index
    return 0
