"""The int8 CPU path (`--dtype int8`): the model's transformer as a dynamically quantised ONNX graph.

The transformer of the SentenceTransformer (its first module) is exported to
ONNX once, on the driver, and its MatMul weights are quantised to int8 per
output channel by ONNX Runtime (activations are quantised per batch at run
time), except those that cost the most accuracy: the feed-forward output
projections (`down_projections`) and every MatMul of the first block
(`first_block`), which stay float32. Pooling, Dense and Normalize stay
sentence-transformers' own modules, in float32. Encoders receive the graph's
bytes through the object store, so every node of a cluster gets the same graph
without a shared disk.

Measured on all-MiniLM-L6-v2 (BENCHMARKS.md, in process, 10,000 fortunes,
cosine to sentence-transformers' float32 `encode`): every MatMul quantised,
1.62x the float32 graph's speed; the feed-forward outputs in float32, 1.35x,
mean 0.99511, minimum 0.96969 (short texts such as "Huh?" fare worst); the
first block too, 1.39x (the same, within noise), mean 0.99575, minimum
0.97978. Per-channel MatMul-only quantisation is the base: quantising every
Linear per tensor dropped the minimum to 0.80, and torch's own dynamic
quantisation to 0.91.

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
    key = f"{fingerprint}|{config.trust_remote_code}|opset{OPSET}|int8-matmul-per-channel-down-and-first-block-fp32"
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
    from onnxruntime.quantization import QuantType, quantize_dynamic
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
        fp32, int8 = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
        axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "token_embeddings"]}
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper, tuple(example[n] for n in names), fp32, input_names=names,
                output_names=["token_embeddings"], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
            )
        quantize_dynamic(
            fp32, int8, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=float32_matmuls(fp32),
            extra_options={"DefaultTensorType": 1},  # FLOAT, for outputs shape inference cannot type
        )
        with open(int8, "rb") as f:
            return f.read()


def float32_matmuls(path: str) -> list[str]:
    """The MatMul nodes left in float32: every feed-forward output projection, and the whole first block."""
    down = down_projections(path)
    first = first_block(path, down)
    return [*first, *(n for n in down if n not in first)]


def first_block(path: str, down: list[str]) -> list[str]:
    """The weight MatMuls up to and including the first down projection, in graph order: the first
    transformer block, found by structure rather than by a model's node names.

    Keeping it in float32 lifted the minimum cosine on 10,000 fortunes from 0.970 to 0.980 at a
    speed within noise (BENCHMARKS.md): its inputs are the embeddings, whose range per batch is
    set by a few outlier tokens.
    """
    import onnx

    if not down:
        return []
    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    block = []
    for node in graph.node:  # ONNX keeps nodes topologically sorted
        if node.op_type == "MatMul" and node.input[1] in weights:
            block.append(node.name)
            if node.name == down[0]:
                return block
    return block


def down_projections(path: str) -> list[str]:
    """The MatMul nodes whose weight maps a wider input to a narrower output: in a BERT-like
    transformer, each feed-forward block's output projection, which stays in float32.

    Their inputs come out of GELU and have the widest range of any activation, so quantising
    them per batch costs the most accuracy (BENCHMARKS.md: min cosine 0.968 -> 0.981 on
    2,000 fortunes, for 1.61x -> 1.36x the float32 graph's speed).
    """
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and len(shapes.get(node.input[1], ())) == 2
        and shapes[node.input[1]][0] > shapes[node.input[1]][1]
    ]


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
