"""Token-aware chunking (--chunk-tokens N, --chunk-overlap M): where a long document is cut.

A document is tokenised once with the model's own tokenizer, without special tokens, prompt or
truncation (a long one a window at a time: `token_offsets`); its tokens' character offsets say
where each chunk starts and ends in the text as read. A chunk holds at most N tokens;
consecutive chunks share about M. The rule for a cut, looked for among the last CUT_WINDOW(N)
tokens a chunk could end with (a chunk is never cut shorter than that):

1. after a sentence's end (`.`, `!`, `?`, `;` before whitespace; their CJK forms, `…`), else
2. at whitespace, else
3. between two words that touch (punctuation, a CJK character), else
4. after the N-th token,

never between two tokens of one character (a byte-level BPE's pieces of an emoji).

The next chunk starts M tokens before the cut, moved forward by at most OVERLAP_SLACK tokens to
the start of a word, so its overlap is between M - OVERLAP_SLACK and M tokens. A chunk's text,
tokenised again on its own, must still give at most N tokens (a cut inside a word may not): any
that does not is shortened by a token until it does. A document of at most N tokens is one chunk
covering its whole text.
"""

from __future__ import annotations

import itertools

import numpy as np

SENTENCE_ENDS = frozenset(".!?;。！？；…")
OVERLAP_SLACK = 8  # tokens an overlap's start may move forward to begin at a word
CHECK_CHUNKS = 256  # chunks tokenised again at once to check them
WINDOW_CHARS = 1 << 16  # a longer document is tokenised this many characters at a time (`token_offsets`)


def token_offsets(tokenizer, text: str, window: int = WINDOW_CHARS) -> np.ndarray:
    """The character offsets (tokens x 2, int64) of `text`'s tokens without special tokens. A text
    longer than `window` is tokenised a window at a time, each ending at whitespace where the last
    half of the window has some (tokenizers split words there, so the tokens are the whole text's),
    so memory follows the window, not the document (tokenizers' Encodings cost ~100 bytes a token)."""
    parts, at = [], 0
    dtype = np.int32 if len(text) < 1 << 31 else np.int64  # 8 bytes a token, not 16
    while at < len(text):
        end = min(at + window, len(text))
        if end < len(text):
            space = _last_space(text, at + window // 2, end)
            end = space if space > at else end
        encoding = tokenizer.encode(text[at:end], add_special_tokens=False)
        parts.append(np.array(encoding.offsets, dtype=dtype).reshape(-1, 2) + at)
        at = end
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype)


def _last_space(text: str, low: int, high: int) -> int:
    """The position of the last whitespace character in text[low:high] that a non-space follows (the
    space a byte-level or SentencePiece token carries in front of its word), else -1."""
    for k in range(high - 1, low - 1, -1):
        if text[k].isspace() and k + 1 < len(text) and not text[k + 1].isspace():
            return k
    return -1


def cut_window(n: int) -> int:
    """How far back from the N-th token a cut may move to fall on a boundary."""
    return max(1, n // 5)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return 0x3000 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF


def boundary_score(text: str, prev_end: int, next_start: int) -> int:
    """How good a cut is between a token ending at `prev_end` and one starting at `next_start`:
    3 a sentence's end (followed by whitespace, or a CJK end), 2 whitespace, 1 two touching words,
    0 inside a word, -1 inside a character."""
    if next_start < prev_end:  # two tokens of one character (byte-level BPE): never cut there
        return -1
    last = text[prev_end - 1] if prev_end > 0 else " "
    spaced = next_start > prev_end or next_start >= len(text)
    if last in SENTENCE_ENDS and (spaced or _is_cjk(last) or last == "…"):  # not 3.14, e.g.x, a.b.c
        return 3
    if spaced:
        return 2
    first = text[next_start] if next_start < len(text) else " "
    if not (last.isalnum() and first.isalnum()) or _is_cjk(last) or _is_cjk(first):
        return 1
    return 0


def chunk_spans(text: str, offsets: np.ndarray, n: int, overlap: int, count_tokens) -> list[tuple[int, int]]:
    """(start char, end char) of each chunk of `text`, whose tokens have the character `offsets`
    (tokens x 2), for chunks of at most `n` tokens sharing about `overlap`. `count_tokens(texts)`
    gives the tokens of each text tokenised on its own: every chunk is checked with it."""
    count = len(offsets)
    if count <= n:
        return [(0, len(text))]
    starts, ends = offsets[:, 0], offsets[:, 1]
    chunks: list[tuple[int, int]] = []
    first = 0
    while True:
        planned = _plan(text, starts, ends, n, overlap, first)  # lazy: a failed check replans from there only
        bad = None
        while bad is None:
            group = list(itertools.islice(planned, CHECK_CHUNKS))  # a few at a time: a 10 MB document has ~10,000
            if not group:
                return [(int(starts[f]), int(ends[e - 1])) for f, e in chunks]
            counts = count_tokens([text[starts[f]:ends[e - 1]] for f, e in group])
            bad = next((i for i, c in enumerate(counts) if c > n), None)
            chunks += group if bad is None else group[:bad]
        f, e = group[bad]
        while e - f > 1 and count_tokens([text[starts[f]:ends[e - 1]]])[0] > n:
            e -= 1  # a cut that tokenises differently on its own (inside a word): one token shorter
        chunks.append((f, e))
        if e >= count:
            return [(int(starts[f]), int(ends[e - 1])) for f, e in chunks]
        first = _next_start(text, starts, ends, f, e, overlap)


def _plan(text: str, starts: np.ndarray, ends: np.ndarray, n: int, overlap: int, first: int):
    """(first token, end token) of the chunks from token `first` to the end, by the cutting rule, one
    after another."""
    count, window = len(starts), cut_window(n)
    while True:
        last = min(first + n, count)  # the chunk is tokens [first, last)
        if last < count:
            last = _best_cut(text, starts, ends, max(first + 1, last - window), last)
        yield first, last
        if last >= count:
            return
        first = _next_start(text, starts, ends, first, last, overlap)


def _next_start(text: str, starts: np.ndarray, ends: np.ndarray, first: int, last: int, overlap: int) -> int:
    nxt = max(first + 1, last - overlap)
    if overlap:
        nxt = _word_start(text, starts, ends, nxt, min(last, nxt + OVERLAP_SLACK))
    return nxt


def _best_cut(text: str, starts: np.ndarray, ends: np.ndarray, low: int, high: int) -> int:
    """The end token in [low, high] whose cut scores best, the latest of equals."""
    best, best_score = high, -1
    for k in range(high, low - 1, -1):
        score = boundary_score(text, int(ends[k - 1]), int(starts[k]))
        if score > best_score:
            best, best_score = k, score
            if score == 3:
                break
    return best


def _word_start(text: str, starts: np.ndarray, ends: np.ndarray, low: int, high: int) -> int:
    """The first token in [low, high) that starts a word (whitespace or a sentence before it), else `low`."""
    for k in range(low, high):
        if boundary_score(text, int(ends[k - 1]), int(starts[k])) >= 2:
            return k
    return low


CHUNK_SPACE = 1 << 24  # a chunk's _row is its document's _row * CHUNK_SPACE + its number: unique, in order


class Chunker:
    """Cuts a block's documents into chunks (TokenizeStage, --chunk-tokens): one row per chunk, with
    `id` '<doc id>#<chunk>', `doc_id`, `chunk`, `start`, `end` (characters of the text as read) and
    `_n_chunks`, the text the chunk's own; `_row` numbers chunks in document order."""

    def __init__(self, backend: str, split_special_tokens: bool, tokens: int, overlap: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(backend)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.tokenizer.encode_special_tokens = split_special_tokens
        self.tokens, self.overlap = tokens, overlap

    def count(self, texts: list[str]) -> list[int]:
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [len(e.ids) for e in encode(texts, add_special_tokens=False)]

    def spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each text's chunks as (start char, end char)."""
        short = [i for i, t in enumerate(texts) if len(t) <= WINDOW_CHARS]
        offsets: dict[int, np.ndarray] = {}
        for g in range(0, len(short), CHECK_CHUNKS):  # short texts a batch at a time (Rust threads)
            idx = short[g : g + CHECK_CHUNKS]
            for i, encoding in zip(idx, self.tokenizer.encode_batch([texts[i] for i in idx], add_special_tokens=False)):
                offsets[i] = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        result = []
        for i, text in enumerate(texts):
            found = offsets.pop(i) if i in offsets else token_offsets(self.tokenizer, text)
            result.append(chunk_spans(text, found, self.tokens, self.overlap, self.count))
        return result

    def expand(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipeline.stages.columns import CHUNK, DOC_ID, END, ID, N_CHUNKS, ROW, START, TEXT, VALID

        n = batch.num_rows
        valid = np.asarray(batch[VALID].to_numpy(zero_copy_only=False), dtype=bool)
        texts = batch[TEXT].to_pylist()
        cut = iter(self.spans([texts[i] for i in np.flatnonzero(valid)]))
        spans = [next(cut) if ok else [(0, 0)] for ok in valid]
        counts = np.fromiter(map(len, spans), np.int64, n)
        take = np.repeat(np.arange(n), counts)
        first = np.zeros(n, np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        chunk = np.arange(len(take)) - np.repeat(first, counts)
        flat = np.array([s for row in spans for s in row], dtype=np.int64).reshape(-1, 2)
        rows = (np.asarray(batch[ROW].to_numpy(zero_copy_only=False), np.int64) if ROW in batch.column_names
                else np.arange(n, dtype=np.int64))
        out = batch.drop_columns([TEXT]).take(pa.array(take))  # not the text: each chunk gets its own
        chunk_texts = [texts[i][s:e] for i, (s, e) in zip(take.tolist(), flat.tolist())]
        doc_ids = out[ID]
        columns = {
            TEXT: pa.array(chunk_texts, pa.string()),
            ID: pc.binary_join_element_wise(doc_ids, pa.array(chunk.astype(str)), "#"),
            DOC_ID: doc_ids,
            CHUNK: pa.array(chunk.astype(np.int32)),
            START: pa.array(flat[:, 0]),
            END: pa.array(flat[:, 1]),
            N_CHUNKS: pa.array(np.repeat(counts, counts).astype(np.int32)),
            ROW: pa.array(rows[take] * CHUNK_SPACE + chunk),
        }
        for name, column in columns.items():
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, column)
            else:
                out = out.append_column(name, column)
        return out
