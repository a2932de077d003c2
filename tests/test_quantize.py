"""pipeline.models.quantize.quantize_per_token on a graph small enough to check by hand.

The graph, in opset 17 as pipeline.models.onnx_graph writes it:

    q = x @ W          k = x @ V          (two weights, one activation: like query and key)
    h = tanh(x)        c = h @ W          (W shared by two MatMuls)
    s = q @ k^T                            (activation by activation: stays float32)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.models.quantize import quantize_per_token

IN, OUT = 16, 8
OUTPUTS = ["q", "k", "c", "s"]


def u8s8_pairs_saturate() -> bool:
    """Whether ONNX Runtime's uint8 x int8 MatMulInteger on this CPU adds the products in pairs
    saturated to int16 (x86 AVX2 without VNNI: VPMADDUBSW), as ONNX Runtime's quantisation docs
    warn. quantize.py holds activations as uint8 with zero point 128, so a raw value is 128 for
    x = 0 and a pair of products reaches 2 * 255 * 127 = 64,770 > 32,767: the sum comes back wrong.
    One pair at the extremes: exact (255 - 128) * 127 * 2 = 32,258; saturated 32,767 - 128 * 254 = 255."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "zero_point"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        [numpy_helper.from_array(np.full((2, 1), 127, np.int8), "b"), numpy_helper.from_array(np.uint8(128), "zero_point")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"a": np.full((1, 2), 255, np.uint8)})[0][0, 0]) != 2 * 127 * 127


# A known bug, not a flaky test: on such a CPU (this repository's 2-core test machine, an AMD EPYC
# with AVX2 and no VNNI) the int8 graph's output matches a numpy model of saturated pairs to 2e-6
# and misses the exact product by up to 1.2 here. On all-MiniLM-L6-v2 and the 1,500 sample texts it
# moves every vector: cosine to float32 mean 0.99540 / min 0.98654, where the same graph with exact
# int32 products gives 0.99672 / 0.98980. 7-bit weights (|q(W)| <= 63, ONNX Runtime's
# `reduce_range`) keep every pair within int16: both tests pass with them on this CPU.
# strict: once fixed, the XPASS says so and the mark goes.
SATURATES = pytest.mark.xfail(u8s8_pairs_saturate(), strict=True,
                              reason="ONNX Runtime's u8s8 MatMulInteger saturates int16 pairs on this CPU (no VNNI)")


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"W": rng.normal(0, 0.2, (IN, OUT)).astype(np.float32), "V": rng.normal(0, 0.2, (IN, OUT)).astype(np.float32)}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, weights) -> tuple[bytes, bytes]:
    """(float32 graph, its quantised form)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", IN])
    shapes = {"q": OUT, "k": OUT, "c": OUT, "s": "seq"}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", shapes[n]]) for n in OUTPUTS]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["q"]),
        helper.make_node("MatMul", ["x", "V"], ["k"]),
        helper.make_node("Tanh", ["x"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["c"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
    ]
    init = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], outputs, init),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("quantize") / "fp32.onnx"
    onnx.save(model, str(path))
    return model.SerializeToString(), quantize_per_token(str(path))


def run(graph: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(OUTPUTS, {"x": x})))


def batch(rows: int = 5, seq: int = 4) -> np.ndarray:
    x = np.random.default_rng(1).normal(0, 1, (rows, seq, IN)).astype(np.float32)
    x[2, 1] *= 50  # an outlier token: a scale per batch (or per row) would coarsen every other token
    return x


def rounding_bound(x: np.ndarray, w: np.ndarray, s_w: np.ndarray | None = None) -> np.ndarray:
    """The most |x @ w - q(x) @ q(w)| can be, per output, with symmetric rounding: s(x) is each
    token's largest |x| / 127, s(w) each column's scale (the graph's `<W>/scale`; by default its
    largest |w| / 127). Each x is off by at most s(x)/2, each w by at most s(w)/2, so
    |error| <= |x| @ s(w)/2 + s(x)/2 * sum|w| + n * s(x) * s(w) / 4. Float32 sums add far less
    than the 1% slack."""
    s_x = np.abs(x).max(axis=-1, keepdims=True) / 127
    s_w = np.abs(w).max(axis=0) / 127 if s_w is None else s_w
    bound = np.abs(x).sum(-1, keepdims=True) * s_w / 2 + s_x / 2 * np.abs(w).sum(0) + w.shape[0] * s_x * s_w / 4
    return bound * 1.01 + 1e-6


def test_every_matmul_by_a_weight_is_int8_and_a_shared_weight_is_quantised_once(graphs):
    _, quantised = graphs
    model = onnx.load_from_string(quantised)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))  # no duplicate initializers
    assert not {"W", "V"} & set(names)  # the float32 weights are gone
    int8 = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    assert sorted(int8) == ["V/int8", "W/int8"]  # W once, though two MatMuls read it
    assert all(tuple(t.dims) == (IN, OUT) for t in int8.values())
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == 3
    assert ops["MatMul"] == 1  # q @ k^T: no weight, stays float32
    assert ops["ReduceMax"] == 2  # one per activation (x, h): q(x) is shared by the two MatMuls that read x


@SATURATES
def test_the_quantised_graph_runs_and_stays_within_the_rounding_error(graphs, weights):
    fp32, quantised = graphs
    scales = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(quantised).graph.initializer}
    x = batch()
    want, got = run(fp32, x), run(quantised, x)
    h = np.tanh(x)
    for name, inputs, w in (("q", x, "W"), ("k", x, "V"), ("c", h, "W")):
        error = np.abs(got[name] - want[name])
        bound = rounding_bound(inputs, weights[w], scales[f"{w}/scale"])
        assert (error <= bound).all(), (name, float((error - bound).max()))
        assert error.max() > 0  # the int8 path really ran
        # and the bound is no formality: against the values themselves the error is about 1%
        # (3% leaves room for 7-bit weights, which would double their share)
        assert error.max() / np.abs(want[name]).max() < 0.03, name
    # q @ k^T in float32 from two quantised products (0.3% here): relative to its own largest value
    assert np.abs(got["s"] - want["s"]).max() / np.abs(want["s"]).max() < 0.03


def test_a_row_does_not_depend_on_the_rows_beside_it(graphs):
    _, quantised = graphs
    x = batch()
    together = run(quantised, x)
    for i in range(len(x)):
        alone = run(quantised, x[i : i + 1])
        for name in OUTPUTS:
            np.testing.assert_array_equal(alone[name][0], together[name][i], err_msg=f"row {i}, {name}")


@SATURATES
def test_a_token_of_large_values_against_large_weights_is_not_clipped(tmp_path):
    """The worst case for 8-bit products: every activation of a token at its largest (uint8 255)
    against a column of weights at theirs (int8 127). Exact integer sums give x @ W within rounding."""
    w = np.linspace(0.5, 1.0, IN * OUT, dtype=np.float32).reshape(IN, OUT)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])
    model = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "one", [x], [y], [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    quantised = quantize_per_token(str(tmp_path / "fp32.onnx"))
    (s_w,) = [numpy_helper.to_array(t) for t in onnx.load_from_string(quantised).graph.initializer if t.name == "W/scale"]
    session = ort.InferenceSession(quantised, providers=["CPUExecutionProvider"])
    inputs = np.ones((2, IN), np.float32) * np.array([[1.0], [3.0]], np.float32)
    (got,) = session.run(["y"], {"x": inputs})
    assert (np.abs(got - inputs @ w) <= rounding_bound(inputs, w, s_w)).all(), np.abs(got - inputs @ w).max()
