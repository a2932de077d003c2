"""The int8 CPU path (`--dtype int8`): every MatMul by a weight of the model's ONNX graph in int8.

pipeline.models.onnx_graph traces the model into one float32 graph and checks it;
`quantize_per_token` then rewrites its weight MatMuls: weights per output
channel, activations per token at run time. Everything else (attention's
softmax, layer norms, pooling, Normalize) stays float32.

Measured on all-MiniLM-L6-v2 (BENCHMARKS.md, 10,000 fortunes in the
pipeline's blocks, cosine to sentence-transformers' float32 `encode`): per
token, mean 0.99584 and minimum 0.97721 at 1.41x the float32 graph's speed
(one thread). ONNX Runtime's dynamic quantisation, per batch, was as fast only
with the feed-forward output projections and the first block left in float32,
and still reached only 0.95945: its scale is set by the batch's largest value,
so a text's vector depended on its batch mates. Quantising every Linear per
tensor had dropped the minimum to 0.80, and torch's own dynamic quantisation
to 0.91.

Both operands are uint8 with zero point 128 (weights too, 2026-12-06): ONNX Runtime's uint8 x int8
kernel on x86 CPUs with AVX2 but no VNNI adds its products in pairs into int16 (VPMADDUBSW) and
saturates, so 8-bit values there came back with wrong sums (255 * 127 * 2 = 64,770 > 32,767); its
uint8 x uint8 kernel widens to int16 first and adds in int32, exact on every CPU, and ran as fast
here (AMD EPYC, AVX2, no VNNI). 7-bit weights (`reduce_range`) were exact too but further from
float32 than the saturated sums; int8 x int8 was exact but 1.7x slower (BENCHMARKS.md, 2026-12-06).
"""

from __future__ import annotations


def quantize_per_token(path: str) -> bytes:
    """The float32 graph at `path` with every MatMul by a weight in int8: the weight per output
    channel, the activations per token, both symmetric.

    x @ W becomes (q(x) @ Wq) * s(x) * s(W), where s(x) is each token's largest |x| / 127 and
    s(W) each output column's. Per token, a text's vector does not depend on the texts that
    share its micro-batch; ONNX Runtime's dynamic quantisation scales a whole batch by its
    largest value, and one outlier token in it coarsened every other row (a long fortune: cosine
    0.9966 to float32 alone, 0.9685 beside 7 others; BENCHMARKS.md). q(x) is computed once per
    activation and shared by the MatMuls that read it (query, key, value).

    Both q(x) and q(W) are held as uint8 with zero point 128 (values -127..127 as 1..255), so ONNX
    Runtime runs its uint8 x uint8 kernel, whose integer sums are exact on every CPU. Its uint8 x
    int8 kernel adds products in int16 pairs on AVX2 without VNNI and saturates (one pair of
    255 * 127 overflows); int8 x int8 ran 1.7x-4x slower (module docstring).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    added: list = []

    def const(name: str, value) -> str:
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    one, eps, levels = const("q_one", np.float32(1)), const("q_eps", np.float32(1e-12)), const("q_127", np.float32(127))
    offset, zero_point = const("q_128", np.float32(128)), const("q_zero_point", np.uint8(128))
    nodes: list = []
    scaled: dict[str, str] = {}  # activation -> prefix of its quantised form
    done: set[str] = set()  # weights already quantised

    def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [output], name=f"{output}/{kind}", **attrs))
        return output

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        x, w_name = node.input
        if len(weights[w_name].dims) != 2:
            nodes.append(node)
            continue
        w_q, w_s = f"{w_name}/uint8", f"{w_name}/scale"
        if w_name not in done:  # a weight shared by two MatMuls is quantised once
            w = numpy_helper.to_array(weights[w_name]).astype(np.float32)
            w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
            const(w_q, (np.clip(np.round(w / w_scale), -127, 127) + 128).astype(np.uint8))
            const(w_s, w_scale.astype(np.float32))
            done.add(w_name)
        if x not in scaled:
            p = f"q{len(scaled)}"
            top = op("ReduceMax", [op("Abs", [x], f"{p}/abs")], f"{p}/max", axes=[-1], keepdims=1)
            scale = op("Div", [op("Max", [top, eps], f"{p}/max_eps"), levels], f"{p}/scale")
            ints = op("Round", [op("Mul", [x, op("Div", [one, scale], f"{p}/inverse")], f"{p}/scaled")], f"{p}/round")
            op("Cast", [op("Add", [ints, offset], f"{p}/shifted")], f"{p}/uint8", to=TensorProto.UINT8)
            scaled[x] = p
        p = scaled[x]
        out = node.output[0]
        acc = op("MatMulInteger", [f"{p}/uint8", w_q, zero_point, zero_point], f"{out}/int32")
        tokens = op("Mul", [op("Cast", [acc], f"{out}/float", to=TensorProto.FLOAT), f"{p}/scale"], f"{out}/token_scaled")
        op("Mul", [tokens, w_s], out)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float32 weights are gone
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model.SerializeToString()
