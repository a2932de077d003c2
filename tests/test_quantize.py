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


def matmul_integer_exact(a_type: int, b_type: int, a: np.ndarray, b: np.ndarray, zero_points: tuple[int, int]) -> bool:
    """Whether ONNX Runtime's MatMulInteger for these operand types gives the exact integer sums of
    raw `a` against raw `b` (less their `zero_points`) on this CPU, as numpy's int64 product does."""
    a_np, b_np = (helper.tensor_dtype_to_np_dtype(t) for t in (a_type, b_type))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero_point", "b_zero_point"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", a_type, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b.astype(b_np), "b"), numpy_helper.from_array(np.array(zero_points[0], a_np), "a_zero_point"),
         numpy_helper.from_array(np.array(zero_points[1], b_np), "b_zero_point")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a.astype(a_np)})
    return np.array_equal(got, (a.astype(np.int64) - zero_points[0]) @ (b.astype(np.int64) - zero_points[1]))


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
    quantised_weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2}
    assert sorted(quantised_weights) == ["V/uint8", "W/uint8"]  # W once, though two MatMuls read it
    for w in quantised_weights.values():
        assert w.dtype == np.uint8 and w.shape == (IN, OUT)
        assert w.min() >= 1 and w.max() <= 255  # -127..127 around the zero point 128: symmetric
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == 3
    assert ops["MatMul"] == 1  # q @ k^T: no weight, stays float32
    assert ops["ReduceMax"] == 2  # one per activation (x, h): q(x) is shared by the two MatMuls that read x


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
        # (3% leaves room for float32 sums)
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


def test_the_integer_kernel_the_graph_uses_is_exact_at_the_extremes(graphs):
    """The operand types of the graph's MatMulIntegers, at their extremes, against exact int64 sums.

    ONNX Runtime's uint8 x int8 kernel on x86 with AVX2 but no VNNI (VPMADDUBSW) adds products in
    pairs into int16 and saturates: one pair of 255 against 127 (2 * 127 * 127 = 32,258 after the
    zero point of 128) comes back wrong; this test's own machine, an AMD EPYC without VNNI, did.
    The graph's uint8 x uint8 must be exact there and everywhere: every pair of raw extremes
    (255 * 255 * 2 = 130,050) and mixed signs, over a feed-forward's width."""
    model = onnx.load_from_string(graphs[1])
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "Cast"})
    kinds = {(types[n.input[0]], types[n.input[1]], types[n.input[2]], types[n.input[3]])
             for n in model.graph.node if n.op_type == "MatMulInteger"}
    assert kinds == {(TensorProto.UINT8,) * 4}, kinds
    rng = np.random.default_rng(2)
    k = 1536
    b = np.concatenate([np.full((k, 1), 255), np.full((k, 1), 1), rng.choice([1, 255], (k, 6))], axis=1)
    a = np.concatenate([np.full((1, k), 255), np.full((1, k), 1), rng.choice([1, 255], (2, k)), rng.integers(1, 256, (4, k))])
    assert matmul_integer_exact(TensorProto.UINT8, TensorProto.UINT8, a, b, zero_points=(128, 128))


def test_a_token_of_large_values_against_large_weights_is_not_clipped(tmp_path):
    """The worst case for 8-bit products: every activation of a token at its largest (raw 255)
    against a column of weights at theirs (raw 255, 127 after the zero point). Exact integer sums
    give x @ W within rounding; saturated int16 pairs (uint8 x int8 on AVX2 without VNNI) did not."""
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
