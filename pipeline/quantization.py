"""What is stored of a vector: `--truncate-dim` and `--precision`, as sentence-transformers defines them.

A run's float32 vectors (the model's output) become what is written in three steps, the order of
`SentenceTransformer.encode(truncate_dim=D, normalize_embeddings=N, precision=P)`:

1. truncation to the first D dimensions (Matryoshka models), after the model's modules;
2. L2 normalisation again when the run normalises (the model's Normalize module or --normalize):
   a truncated unit vector is no longer one; this is `encode(..., normalize_embeddings=True)`;
3. quantisation (`quantize_embeddings`): float16 as a cast; binary/ubinary per row (the sign bits
   packed with `numpy.packbits`, binary offset by -128 into int8); int8/uint8 into 256 buckets per
   dimension between the run's `ranges` (`[[min per dim], [max per dim]]`), computed once for the
   whole run (see pipeline.commands.calibrate), never per block.

Reading back (`decode`): float outputs as float32; int8/uint8 dequantised to each bucket's centre;
binary/ubinary as their +1/-1 vectors, whose cosine is 1 - 2 * Hamming / dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
QUANTIZED = ("int8", "uint8", "binary", "ubinary")
NEEDS_RANGES = ("int8", "uint8")
_ARROW_VALUES = {
    "float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
    "binary": pa.int8(), "ubinary": pa.uint8(),
}


@dataclass(frozen=True)
class VectorFormat:
    """How a run's vectors are stored: precision, logical dimension, truncation, int8/uint8 ranges."""

    precision: str = "float32"
    dim: int | None = None
    """The logical dimension (after truncation): a binary vector of 384 dims is 48 bytes, dim 384."""
    truncate_dim: int | None = None
    normalize: bool = False
    """L2-normalise again after truncation (the run normalises); no effect without truncate_dim."""
    ranges: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None, width: int | None = None) -> "VectorFormat":
        """The format recorded in a run's identity settings (pipeline.identity); an output written
        before precisions existed (no `precision`) stored `output_dtype` floats of `width` dims."""
        settings = settings or {}
        precision = settings.get("precision") or settings.get("output_dtype") or "float32"
        quantization = settings.get("quantization") or {}
        ranges = quantization.get("ranges")
        dim = settings.get("dim") or dim_of_width(precision, width)
        return cls(
            precision=precision, dim=dim, truncate_dim=settings.get("truncate_dim"),
            normalize=bool(settings.get("normalize")),
            ranges=(tuple(ranges[0]), tuple(ranges[1])) if ranges else None,
        )

    @property
    def width(self) -> int | None:
        """Values stored per vector (the fixed_size_list's size)."""
        if self.dim is None:
            return None
        return (self.dim + 7) // 8 if self.precision in ("binary", "ubinary") else self.dim

    @property
    def bytes_per_vector(self) -> int | None:
        if self.width is None:
            return None
        return self.width * (4 if self.precision == "float32" else 2 if self.precision == "float16" else 1)

    def arrow_type(self) -> pa.DataType:
        return pa.list_(_ARROW_VALUES[self.precision], self.width)

    def ranges_array(self) -> np.ndarray | None:
        return None if self.ranges is None else np.asarray(self.ranges, np.float32)

    # ---------------------------------------------------------------- writing

    def finish(self, vectors: np.ndarray) -> np.ndarray:
        """Steps 1 and 2: the float32 vectors as they are quantised (truncated, normalised again)."""
        if self.truncate_dim is None or self.truncate_dim >= vectors.shape[1]:
            return vectors
        vectors = np.ascontiguousarray(vectors[:, : self.truncate_dim])
        if self.normalize:
            vectors = normalized(vectors)
        return vectors

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        """Step 3 on finished float32 vectors: the stored values, (rows, width)."""
        return quantize(vectors, self.precision, self.ranges_array())

    def stored(self, vectors: np.ndarray) -> pa.FixedSizeListArray:
        """The float32 model vectors (rows, model dim) as the stored `embedding` column."""
        values = self.quantize(self.finish(np.asarray(vectors, np.float32)))
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

    # ---------------------------------------------------------------- reading

    def decode(self, values: np.ndarray, dequantize: bool = True) -> np.ndarray:
        """Stored values (rows, width) back as float32 (rows, dim), or as stored without `dequantize`
        for int8/uint8/binary/ubinary."""
        if self.precision in ("float32", "float16"):
            return np.asarray(values, np.float32)
        if not dequantize:
            return values
        return dequantized(values, self.precision, self.ranges_array(), self.dim)


def dim_of_width(precision: str, width: int | None) -> int | None:
    """The dimension of vectors stored `width` values wide, where none was recorded: binary/ubinary
    pack 8 dimensions a byte (a dimension count that was not a multiple of 8 reads as the next one)."""
    if width is None:
        return None
    return width * 8 if precision in ("binary", "ubinary") else width


def normalized(vectors: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize(p=2, dim=1) in numpy: rows over max(norm, 1e-12)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """`sentence_transformers.quantization.quantize_embeddings(vectors, precision, ranges=ranges)`,
    without its per-call ranges: int8/uint8 need `ranges`, (2, dim) float32."""
    vectors = np.asarray(vectors, np.float32)
    if precision == "float32":
        return vectors
    if precision == "float16":
        return vectors.astype(np.float16)
    if precision in NEEDS_RANGES:
        if ranges is None:
            raise ValueError(f"precision {precision} needs the run's ranges")
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(vectors > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def dequantized(values: np.ndarray, precision: str, ranges: np.ndarray | None, dim: int | None) -> np.ndarray:
    """float32 vectors from stored int8/uint8 (each bucket's centre) or binary/ubinary (+1/-1)."""
    if precision in NEEDS_RANGES:
        if ranges is None:
            raise ValueError(f"{precision} vectors without their ranges cannot be dequantised")
        starts = ranges[0].astype(np.float64)
        raw = (ranges[1].astype(np.float64) - starts) / 255
        steps = np.where(raw == 0, 1, raw)
        centre = np.where(raw == 0, 0.0, 0.5)  # a dimension of one value (min == max) reads back as that value
        buckets = values.astype(np.float64) + (128 if precision == "int8" else 0)
        return ((buckets + centre) * steps + starts).astype(np.float32)
    if precision in ("binary", "ubinary"):
        packed = values.astype(np.int16) + 128 if precision == "binary" else values
        bits = np.unpackbits(packed.astype(np.uint8), axis=-1)
        if dim is not None:
            bits = bits[:, :dim]
        return bits.astype(np.float32) * 2 - 1
    return np.asarray(values, np.float32)


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of finished vectors: `quantize_embeddings`' calibration."""
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def from_column(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list column as a (rows, width) array of its own type."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(-1, width) if width else np.zeros((len(column), 0), np.float32)
