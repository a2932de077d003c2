"""Distinct short English sentences from Princeton WordNet: every gloss's definition and
quoted examples, split at ';' (Debian's `wordnet-base`, /usr/share/wordnet).

About 180,000 texts of 47 characters (~11 tokens) on average: the "short sentences" of the
GPU benchmark (BENCHMARKS.md). Run as a script to write them one per line:

    python data/short_sentences.py OUT.txt [--limit N]
"""

from __future__ import annotations

import argparse
import os

WORDNET = "/usr/share/wordnet"


def short_sentences(root: str = WORDNET, min_chars: int = 10) -> list[str]:
    """Distinct definitions and examples of all four parts of speech, in file order."""
    seen, out = set(), []
    for pos in ("noun", "verb", "adj", "adv"):
        path = os.path.join(root, f"data.{pos}")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: apt-get install wordnet-base")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:  # the licence header
                    continue
                for part in line.split("|", 1)[1].split(";"):
                    text = " ".join(part.strip().strip('"').split())
                    if len(text) >= min_chars and text not in seen:
                        seen.add(text)
                        out.append(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output")
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    texts = short_sentences()[: args.limit]
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
    print(f"{len(texts)} sentences -> {args.output}")


if __name__ == "__main__":
    main()
