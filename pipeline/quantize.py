"""The int8 CPU path (`--dtype int8`): the model's transformer as a dynamically quantised ONNX graph.

The transformer of the SentenceTransformer (its first module) is exported to
ONNX once, on the driver, and every MatMul by a weight is rewritten to int8
(`quantize_per_token`): weights per output channel, activations per token at
run time. Pooling, Dense and Normalize stay sentence-transformers' own
modules, in float32. Encoders receive the graph's bytes through the object
store, so every node of a cluster gets the same graph without a shared disk.

Measured on all-MiniLM-L6-v2 (BENCHMARKS.md, 10,000 fortunes in the
pipeline's blocks, cosine to sentence-transformers' float32 `encode`): per
token, mean 0.99584 and minimum 0.97721 at 1.41x the float32 graph's speed
(one thread). ONNX Runtime's dynamic quantisation, per batch, was as fast only
with the feed-forward output projections and the first block left in float32,
and still reached only 0.95945: its scale is set by the batch's largest value,
so a text's vector depended on its batch mates. Quantising every Linear per
tensor had dropped the minimum to 0.80, and torch's own dynamic quantisation
to 0.91.

The export runs attention in its "eager" form: the default SDPA path has
data-dependent branches that tracing freezes into the graph (its vectors then
disagreed with PyTorch's, mean cosine 0.956).
"""

from __future__ import annotations

import logging
import os
import tempfile

from pipeline import cache
from pipeline.config import EmbedConfig
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def int8_graph(config: EmbedConfig, fingerprint: str) -> bytes:
    """The quantised ONNX graph of the model's transformer, built once and cached by model fingerprint
    (pipeline.cache; a cached graph is read without importing torch)."""
    key = f"{fingerprint}|{config.trust_remote_code}|opset{OPSET}|int8-weights-per-channel-activations-per-token"
    path = cache.entry_path("int8", key, ".onnx")
    data = cache.read(path)
    if data is None:
        data = build_int8_graph(config)
        cache.write(path, data)
    return data


def require_onnxruntime() -> None:
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):
        raise UsageError("--dtype int8 needs ONNX Runtime: pip install 'embedpipe[int8]'")


def build_int8_graph(config: EmbedConfig) -> bytes:
    require_onnxruntime()
    import torch
    from sentence_transformers.base.modules import Transformer

    from pipeline.model import load_model

    model = load_model(config, device="cpu", weights=True)
    first = model[0]
    if not isinstance(first, Transformer):
        raise UsageError(f"--dtype int8: model {config.model} does not start with a Transformer module")
    hf = first.auto_model
    _use_eager_attention(hf)
    example = model.preprocess(["an example sentence to trace", "a second, rather longer example sentence to trace"])
    names = [n for n in INPUT_NAMES if n in example]
    wrapper = _last_hidden_state(hf, names).eval()
    with tempfile.TemporaryDirectory() as work:
        fp32 = os.path.join(work, "fp32.onnx")
        axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "token_embeddings"]}
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper, tuple(example[n] for n in names), fp32, input_names=names,
                output_names=["token_embeddings"], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
            )
        return quantize_per_token(fp32)


def quantize_per_token(path: str) -> bytes:
    """The float32 graph at `path` with every MatMul by a weight in int8: the weight per output
    channel, the activations per token, both symmetric.

    x @ W becomes (q(x) @ Wq) * s(x) * s(W), where s(x) is each token's largest |x| / 127 and
    s(W) each output column's. Per token, a text's vector does not depend on the texts that
    share its micro-batch; ONNX Runtime's dynamic quantisation scales a whole batch by its
    largest value, and one outlier token in it coarsened every other row (a long fortune: cosine
    0.9966 to float32 alone, 0.9685 beside 7 others; BENCHMARKS.md). q(x) is computed once per
    activation and shared by the MatMuls that read it (query, key, value), and held as uint8
    with zero point 128: ONNX Runtime's int8 x int8 kernel ran 4x slower here than uint8 x int8.
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
        w_q, w_s = f"{w_name}/int8", f"{w_name}/scale"
        if w_name not in done:  # a weight shared by two MatMuls is quantised once
            w = numpy_helper.to_array(weights[w_name]).astype(np.float32)
            w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
            const(w_q, np.clip(np.round(w / w_scale), -127, 127).astype(np.int8))
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
        acc = op("MatMulInteger", [f"{p}/uint8", w_q, zero_point], f"{out}/int32")
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


def _use_eager_attention(hf) -> None:
    """Eager attention: traceable without data-dependent branches frozen into the graph."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        hf.config._attn_implementation = "eager"


def _last_hidden_state(hf, names: list[str]):
    """The Hugging Face model called with named inputs, given positionally as tracing wants."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, *inputs):
            return self.hf(**dict(zip(names, inputs)), return_dict=True).last_hidden_state

    return LastHiddenState()


class Int8Transformer:
    """Runs the quantised graph in place of the model's first module; the rest stay as they are."""

    def __init__(self, graph: bytes, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, features: dict) -> dict:
        import torch

        feeds = {name: features[name].numpy() for name in self.inputs}
        (hidden,) = self.session.run(["token_embeddings"], feeds)
        return {**features, "token_embeddings": torch.from_numpy(hidden)}
