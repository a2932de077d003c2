"""A graded similarity task built from public data: pairs of WordNet noun glosses.

Princeton WordNet (Debian's `wordnet-base`, /usr/share/wordnet) links noun
synsets into a hypernym tree. Each pair of synsets gets a gold similarity,
Wu-Palmer's: 2 * depth(deepest common ancestor) / (depth(a) + depth(b)),
depth counted from the root `entity` (1). The texts embedded are the two
synsets' definitions (glosses, without their examples), so a model must judge
how related two definitions are; Spearman's correlation between the cosines
and the gold scores measures how well it does, and its change measures what a
reduced-precision path costs.

Pairs are drawn evenly from four bands: siblings (same parent), cousins
(same grandparent), same top-level branch, and random, so the gold scores
cover the whole range instead of piling up near the random baseline.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache

WORDNET = "/usr/share/wordnet"


def read_nouns(root: str = WORDNET) -> dict[str, tuple[str, list[str]]]:
    """{offset: (gloss, hypernym offsets)} of every noun synset."""
    path = os.path.join(root, "data.noun")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: apt-get install wordnet-base")
    nouns = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            parts = head.split()
            offset, words = parts[0], int(parts[3], 16)
            k = 4 + 2 * words
            pointers = int(parts[k])
            hypernyms = [parts[k + 1 + 4 * i + 1] for i in range(pointers) if parts[k + 1 + 4 * i] in ("@", "@i")]
            definition = gloss.split(";")[0].strip().strip('"').strip()
            nouns[offset] = (definition, hypernyms)
    return nouns


def pairs(n: int = 2000, seed: int = 0, root: str = WORDNET) -> list[tuple[str, str, float]]:
    """n (gloss a, gloss b, Wu-Palmer similarity) triples."""
    nouns = read_nouns(root)

    @lru_cache(maxsize=None)
    def ancestors(offset: str) -> dict[str, int]:
        """Every ancestor (self included) at its distance from `offset`."""
        out = {offset: 0}
        for parent in nouns[offset][1]:
            for a, d in ancestors(parent).items():
                if d + 1 < out.get(a, 1 << 30):
                    out[a] = d + 1
        return out

    @lru_cache(maxsize=None)
    def depth(offset: str) -> int:
        parents = nouns[offset][1]
        return 1 + (min(depth(p) for p in parents) if parents else 0)

    def wup(a: str, b: str) -> float:
        common = set(ancestors(a)) & set(ancestors(b))
        if not common:
            return 0.0
        return min(1.0, 2 * max(depth(c) for c in common) / (depth(a) + depth(b)))  # multiple parents can push it past 1

    import sys

    sys.setrecursionlimit(10_000)
    rng = random.Random(seed)
    usable = [o for o, (g, h) in nouns.items() if h and len(g.split()) >= 3]
    children: dict[str, list[str]] = {}
    for o in usable:
        for h in nouns[o][1]:
            children.setdefault(h, []).append(o)
    families = [kids for kids in children.values() if len(kids) >= 2]
    out, seen = [], set()
    while len(out) < n:
        band = len(out) % 4
        if band == 0:  # siblings
            a, b = rng.sample(rng.choice(families), 2)
        elif band == 1:  # cousins: children of two children of one synset
            parent = rng.choice(families)
            x, y = rng.sample(parent, 2)
            if x not in children or y not in children:
                continue
            a, b = rng.choice(children[x]), rng.choice(children[y])
        elif band == 2:  # same branch below the top levels
            a = rng.choice(usable)
            branch = [o for o, d in ancestors(a).items() if depth(o) == 4]
            if not branch:
                continue
            b = rng.choice(usable)
            if branch[0] not in ancestors(b):
                continue
        else:
            a, b = rng.sample(usable, 2)
        key = (min(a, b), max(a, b))
        if a == b or key in seen or nouns[a][0] == nouns[b][0]:
            continue
        seen.add(key)
        out.append((nouns[a][0], nouns[b][0], wup(a, b)))
    return out
