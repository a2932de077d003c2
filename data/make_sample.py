"""Regenerate data/sample/ (the corpus `make run` embeds) from Debian's fortunes.

    apt-get install fortunes fortunes-min fortunes-de fortunes-zh
    python data/make_sample.py

Writes 1,000 English texts (en.txt), 300 German (de.jsonl) and 200 Chinese
(zh.csv): three formats, three languages, real and a little dirty.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fortunes import FORTUNE_DIR, english_corpus, read_fortunes  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "sample")


def pick(texts: list[str], n: int, max_chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    short = [t for t in texts if len(t) <= max_chars]
    return rng.sample(short, n)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    english = pick(english_corpus(), 1000, 400, seed=1)
    with open(os.path.join(OUT, "en.txt"), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in english)
    de_dir = os.path.join(FORTUNE_DIR, "de")
    german_names = sorted(f"de/{n}" for n in os.listdir(de_dir) if "." not in n)
    german = pick(read_fortunes(german_names), 300, 400, seed=2)
    with open(os.path.join(OUT, "de.jsonl"), "w", encoding="utf-8") as f:
        for i, t in enumerate(german):
            f.write(json.dumps({"text": t, "lang": "de", "n": i}, ensure_ascii=False) + "\n")
    chinese = pick(read_fortunes(["tang300", "song100", "chinese"]), 200, 300, seed=3)
    with open(os.path.join(OUT, "zh.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "lang"])
        writer.writerows([t, "zh"] for t in chinese)


if __name__ == "__main__":
    main()
