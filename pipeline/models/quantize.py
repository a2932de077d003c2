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
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    rewrite = _Rewrite({t.name: t for t in graph.initializer})
    nodes = []
    for node in graph.node:
        nodes += rewrite.matmul(node) if rewrite.by_weight(node) else [node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(rewrite.added)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float32 weights are gone
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Rewrite:
    """The nodes and constants that replace each MatMul by a 2-D weight (see quantize_per_token)."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.added: list = []  # new initializers
        self.nodes: list = []  # nodes of the MatMul being rewritten
        self.scaled: dict[str, str] = {}  # activation -> prefix of its quantised form
        self.done: set[str] = set()  # weights already quantised
        self.one, self.eps = self.const("q_one", 1.0), self.const("q_eps", 1e-12)
        self.levels, self.offset = self.const("q_127", 127.0), self.const("q_128", 128.0)
        self.zero_point = self.const("q_zero_point", 128, "uint8")

    def const(self, name: str, value, dtype: str = "float32") -> str:
        import numpy as np
        from onnx import numpy_helper

        self.added.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(kind, inputs, [output], name=f"{output}/{kind}", **attrs))
        return output

    def by_weight(self, node) -> bool:
        return node.op_type == "MatMul" and node.input[1] in self.weights and len(self.weights[node.input[1]].dims) == 2

    def matmul(self, node) -> list:
        """x @ W as (q(x) @ q(W)) * s(x) * s(W), in int32 then float32."""
        from onnx import TensorProto

        self.nodes = []
        x, w_name = node.input
        w_q, w_s = self.weight(w_name)
        p = self.activation(x)
        out = node.output[0]
        acc = self.op("MatMulInteger", [f"{p}/uint8", w_q, self.zero_point, self.zero_point], f"{out}/int32")
        as_float = self.op("Cast", [acc], f"{out}/float", to=TensorProto.FLOAT)
        tokens = self.op("Mul", [as_float, f"{p}/scale"], f"{out}/token_scaled")
        self.op("Mul", [tokens, w_s], out)
        return self.nodes

    def weight(self, w_name: str) -> tuple[str, str]:
        """W per output column: uint8 values 1..255 (zero point 128) and float32 scales; once per weight."""
        import numpy as np
        from onnx import numpy_helper

        w_q, w_s = f"{w_name}/uint8", f"{w_name}/scale"
        if w_name not in self.done:  # a weight shared by two MatMuls is quantised once
            w = numpy_helper.to_array(self.weights[w_name]).astype(np.float32)
            w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
            self.const(w_q, (np.clip(np.round(w / w_scale), -127, 127) + 128).astype(np.uint8), "uint8")
            self.const(w_s, w_scale.astype(np.float32))
            self.done.add(w_name)
        return w_q, w_s

    def activation(self, x: str) -> str:
        """x per token (its last axis) at run time, once per activation: the prefix of `<p>/uint8` and `<p>/scale`."""
        from onnx import TensorProto

        if x not in self.scaled:
            p, op = f"q{len(self.scaled)}", self.op
            top = op("ReduceMax", [op("Abs", [x], f"{p}/abs")], f"{p}/max", axes=[-1], keepdims=1)
            scale = op("Div", [op("Max", [top, self.eps], f"{p}/max_eps"), self.levels], f"{p}/scale")
            inverse = op("Div", [self.one, scale], f"{p}/inverse")
            ints = op("Round", [op("Mul", [x, inverse], f"{p}/scaled")], f"{p}/round")
            op("Cast", [op("Add", [ints, self.offset], f"{p}/shifted")], f"{p}/uint8", to=TensorProto.UINT8)
            self.scaled[x] = p
        return self.scaled[x]
