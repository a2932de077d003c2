"""sentence-transformers' text tokenisation as a bare `tokenizers` pipeline: no torch in the tokenizer actors.

A tokenizer actor that loads the SentenceTransformer (even without weights)
imports torch, transformers and sentence-transformers: about 10 CPU-seconds
and ~500 MiB per actor, on the cores the encoders are starting on. For a
text model whose input module is a fast (Rust) tokenizer, what `preprocess`
does to a string is: prepend the prompt, run the backend tokenizer with
truncation at `model_max_length` and special tokens, and return its ids
(and token types). `spec_for` captures that backend, after every change
sentence-transformers and transformers made to it when loading (an added
lower-casing, the truncation side, split special tokens), where the model is
loaded anyway (the driver's describe child), and checks it there against
`preprocess` on PROBE_TEXTS. A model whose check fails, or whose input
module is anything else, gets no spec: its actors load sentence-transformers
as before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

# transformers' "no limit" model_max_length is 1e30; a tokenizer above this does not truncate
NO_LIMIT = 1 << 40
ENCODE_TEXTS = 1024  # texts encoded at once: a block of chunks of a 10 MB document is ~10,000 texts
# The features `preprocess` returns per token, and where a `tokenizers.Encoding` keeps them.
ENCODING_FIELDS = {"input_ids": "ids", "token_type_ids": "type_ids"}

PROBE_TEXTS = [
    "A plain sentence.",
    "",
    " ",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnew\r\nlines\u00a0and no-break spaces",
    "UPPER case, MiXeD Case and Title Case Words",
    "Accents: café, naïve, Ångström, façade, Øresund, Straße",
    "数据管道把文档变成向量。",
    "Emoji 🙂🚀 and symbols ©®™ ≤≥ ½ \u200b zero-width",
    "عربى and עברית, right to left",
    "Special tokens in text: [CLS] [SEP] [PAD] [MASK] [UNK] <s> </s> <pad> <unk> <mask> <|endoftext|>",
    "Numbers 3.14159, 1,000,000 and dates 2026-11-25; URLs https://example.com/a?b=c#d",
    "Control\x00chars\x07and\x1bescapes",
    "Don't stop: it's \"quoted\", 'single', (parens) {braces} and ellipses…",
    "Combining e\u0301 and precomposed é; ligature ﬁ; fullwidth ＡＢＣ",
    " ".join(["A long text that has to be cut at the model's limit."] * 600),
]


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer actor needs to tokenise text as `preprocess` does, without sentence-transformers."""

    backend: str
    """The Rust tokenizer as JSON (`tokenizers.Tokenizer.to_str`), as the loaded model holds it."""
    fields: tuple[tuple[str, str], ...]
    """(feature name, `Encoding` attribute) of each per-token feature, `input_ids` first."""
    max_len: int | None
    """Truncation length (the model's max_seq_length, special tokens included); None: no limit."""
    truncation_side: str
    split_special_tokens: bool
    prompt: str | None
    left_pad: bool = False
    """The tokenizer pads on the left (pipeline.stages.batching.padding)."""
    pad_values: tuple[tuple[str, int], ...] = ()
    """(feature, pad value) of each per-token feature, as the tokenizer pads it."""


def spec_for(model, prompt: str | None) -> TokenizerSpec | None:
    """The spec of a loaded SentenceTransformer's text tokenisation, or None where it cannot be
    captured (not a fast tokenizer, a multimodal processor or chat template, a per-token feature
    other than ids and token types) or does not reproduce `preprocess` on PROBE_TEXTS."""
    first = model[0]
    tokenizer = getattr(first, "tokenizer", None)
    if (
        tokenizer is None
        or getattr(first, "processor", tokenizer) is not tokenizer
        or not getattr(tokenizer, "is_fast", False)
        or set(getattr(first, "modality_config", None) or {"text": {}}) != {"text"}
    ):
        return None
    from pipeline.stages.batching import padding

    limit = tokenizer.model_max_length
    left, pad_values = padding(tokenizer)
    spec = TokenizerSpec(
        backend=tokenizer.backend_tokenizer.to_str(),
        fields=(),
        max_len=int(limit) if limit is not None and limit < NO_LIMIT else None,
        truncation_side=getattr(tokenizer, "truncation_side", "right"),
        split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
        prompt=prompt,
        left_pad=left,
        pad_values=tuple(sorted(pad_values.items())),
    )
    try:
        expected = model.preprocess(PROBE_TEXTS, prompt=prompt)
    except Exception:  # noqa: BLE001 - whatever fails here, the actors' own path decides
        return None
    mask = expected["attention_mask"].numpy().astype(bool)
    names = [k for k, v in expected.items() if k != "attention_mask" and tuple(getattr(v, "shape", ())) == mask.shape]
    if "input_ids" not in names or not set(names) <= set(ENCODING_FIELDS):
        return None
    names.sort(key=lambda k: k != "input_ids")
    spec = replace(spec, fields=tuple((k, ENCODING_FIELDS[k]) for k in names))
    got, lengths = PlainTokenizer(spec).encode(PROBE_TEXTS)
    if not np.array_equal(lengths, mask.sum(axis=1)):
        return None
    for name, values in got.items():
        if not np.array_equal(values, expected[name].numpy()[mask]):
            return None
    return spec


class PlainTokenizer:
    """Tokenises text as `preprocess` does for the model a `TokenizerSpec` came from."""

    def __init__(self, spec: TokenizerSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self._tokenizers = {}
        for extra in (0, 1):  # at max_len, and one token longer to tell which rows were cut
            tok = Tokenizer.from_str(spec.backend)
            tok.no_padding()
            if spec.max_len is None:
                tok.no_truncation()
            else:
                tok.enable_truncation(spec.max_len + extra, strategy="longest_first",
                                      direction=spec.truncation_side)
            tok.encode_special_tokens = spec.split_special_tokens
            self._tokenizers[extra] = tok

    def encode(self, texts: list[str], longer: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({feature: token values of every text, one after another}, tokens per text)."""
        if self.spec.prompt:
            texts = [self.spec.prompt + t for t in texts]
        tokenizer = self._tokenizers[int(longer)]
        # encode_batch_fast: the same ids without the character offsets, which nothing here reads
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        parts: dict[str, list[np.ndarray]] = {name: [] for name, _ in self.spec.fields}
        all_lengths = []
        for start in range(0, len(texts), ENCODE_TEXTS):  # Encodings cost ~100 bytes a token: a few at a time
            encodings = encode(texts[start : start + ENCODE_TEXTS], add_special_tokens=True)
            lengths = None
            for name, field in self.spec.fields:
                rows = [getattr(e, field) for e in encodings]
                if lengths is None:
                    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
                parts[name].append(np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum())))
            all_lengths.append(lengths if lengths is not None else np.zeros(len(encodings), np.int64))
            del encodings
        features = {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in parts.items()}
        return features, (np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64))
