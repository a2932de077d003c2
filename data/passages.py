"""Distinct English passages of about 74 MiniLM tokens: consecutive WordNet sentences
(data/short_sentences.py) joined until a passage holds --words words (default 50).

The "passages" of the GPU benchmark (issue 21 asks for ~68-token passages, as the field's published
figures for e5-small use). Run as a script to write them one per line:

    python data/passages.py OUT.txt [--words 50] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from short_sentences import short_sentences  # noqa: E402


def passages(words: int = 50) -> list[str]:
    """Every WordNet sentence once, in file order, joined (". ") into passages of at least `words` words."""
    out, current, count = [], [], 0
    for text in short_sentences():
        current.append(text)
        count += len(text.split())
        if count >= words:
            out.append(". ".join(current) + ".")
            current, count = [], 0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output")
    p.add_argument("--words", type=int, default=50)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    texts = passages(args.words)[: args.limit]
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
    print(f"{len(texts)} passages -> {args.output}")


if __name__ == "__main__":
    main()
