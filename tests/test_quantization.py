"""pipeline.quantization against sentence-transformers' own functions: quantize_embeddings for every
precision (dimensions that are not a multiple of 8 too), truncation with normalisation as
encode(truncate_dim, normalize_embeddings) does it, and reading back (bucket centres, +1/-1)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from sentence_transformers.util import quantize_embeddings, truncate_embeddings

from pipeline.quantization import (
    PRECISIONS, VectorFormat, dequantized, from_column, quantize, ranges_of,
)


def vectors(n=300, dim=384, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [384, 20])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_equals_quantize_embeddings(precision, dim):
    v = vectors(dim=dim)
    ranges = ranges_of(v[:50])  # calibration rows: the rest falls outside sometimes, and is clipped
    ours = quantize(v, precision, ranges)
    if precision == "float16":
        assert ours.dtype == np.float16 and np.array_equal(ours, v.astype(np.float16))
        return
    ref = quantize_embeddings(v, precision, ranges=ranges if precision.endswith("int8") else None)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    fmt = VectorFormat(precision, dim, ranges=(tuple(ranges[0]), tuple(ranges[1])))
    assert fmt.width == ours.shape[1] and fmt.bytes_per_vector == ours.nbytes // len(v)
    assert fmt.arrow_type() == pa.list_(pa.from_numpy_dtype(ours.dtype), ours.shape[1])


def test_ranges_are_those_quantize_embeddings_calibrates():
    v = vectors()
    calibration = v[:100]
    assert np.array_equal(quantize(v, "uint8", ranges_of(calibration)),
                          quantize_embeddings(v, "uint8", calibration_embeddings=calibration))


def test_binary_reads_back_as_plus_minus_one_with_hamming_cosine():
    dim = 20  # packs into 3 bytes, the last one half padding
    v = vectors(50, dim)
    for precision in ("binary", "ubinary"):
        stored = quantize(v, precision)
        signs = dequantized(stored, precision, None, dim)
        assert signs.shape == (50, dim) and set(np.unique(signs)) == {-1.0, 1.0}
        assert np.array_equal(signs > 0, v > 0)
        hamming = (signs[:, None, :] != signs[None, :, :]).sum(-1)
        cos = signs @ signs.T / dim
        assert np.allclose(cos, 1 - 2 * hamming / dim)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_dequantised_is_the_bucket_centre(precision):
    v = vectors()
    ranges = ranges_of(v)
    back = dequantized(quantize(v, precision, ranges), precision, ranges, None)
    step = (ranges[1] - ranges[0]) / 255
    # every value lies in its bucket (the top value alone sits on the last bucket's upper edge)
    assert (np.abs(back - v) <= step / 2 * (1 + 1e-4)).all()
    assert np.corrcoef(back.ravel(), v.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("normalize", [True, False])
def test_truncation_then_normalisation_as_encode_does_it(normalize):
    v = vectors(40, 64) * 3
    fmt = VectorFormat("float32", 16, truncate_dim=16, normalize=normalize)
    ref = truncate_embeddings(torch.from_numpy(v), 16)
    if normalize:
        ref = torch.nn.functional.normalize(ref, p=2, dim=1)
    assert np.allclose(fmt.finish(v), ref.numpy(), atol=1e-7)
    assert fmt.finish(v).shape == (40, 16)


def test_stored_column_and_from_settings():
    v = vectors(10, 24)
    settings = {"precision": "ubinary", "dim": 24, "normalize": True}
    fmt = VectorFormat.from_settings(settings)
    column = fmt.stored(v)
    assert column.type == pa.list_(pa.uint8(), 3)
    assert np.array_equal(fmt.decode(from_column(column)) > 0, v > 0)
    old = VectorFormat.from_settings({"output_dtype": "float16"}, width=24)  # written before --precision
    assert old.precision == "float16" and old.dim == 24


def test_a_dimension_of_one_value_reads_back_as_that_value():
    v = vectors(10, 8)
    v[:, 3] = 0.25  # min == max in the calibration rows
    ranges = ranges_of(v)
    for precision in ("int8", "uint8"):
        back = dequantized(quantize(v, precision, ranges), precision, ranges, None)
        assert np.allclose(back[:, 3], 0.25)
