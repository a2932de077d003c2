"""Read Debian's fortune databases as a list of documents.

Entries are separated by lines holding `%`. Lines of one entry are joined
with spaces and stray ANSI colour codes (common in fortunes-zh) are removed.
Install them with `apt-get install fortunes fortunes-min fortunes-de fortunes-zh`.
"""

from __future__ import annotations

import os
import re

FORTUNE_DIR = "/usr/share/games/fortunes"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read_fortunes(names: list[str], root: str = FORTUNE_DIR) -> list[str]:
    """Distinct entries of the named databases (e.g. "fortunes", "de/bahnhof"), in file order."""
    seen, out = set(), []
    for name in names:
        path = os.path.join(root, name)
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for entry in re.split(r"^%\s*$", raw, flags=re.M):
            text = " ".join(ANSI.sub("", entry).split())
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def english_corpus(root: str = FORTUNE_DIR) -> list[str]:
    """All English fortunes of the `fortunes` and `fortunes-min` packages."""
    names = sorted(
        n for n in os.listdir(root)
        if os.path.isfile(os.path.join(root, n)) and "." not in n
        and n not in ("chinese", "tang300", "song100")
    )
    return read_fortunes(names, root)
