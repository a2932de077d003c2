"""The CPU encoders' ONNX Runtime path: the whole SentenceTransformer as one ONNX graph.

On CPU, an encoder that runs PyTorch imports torch and sentence-transformers
first: about 11 CPU-seconds and ~300 MiB per encoder, on the cores the other
stages are starting on (BENCHMARKS.md). Here the model's own modules
(Transformer, Pooling, Dense, Normalize) are traced once into one ONNX graph,
token ids in, pooled vector out, and an encoder only loads ONNX Runtime (0.3 s)
and runs it. sentence-transformers' modules are not rewritten: the graph is
theirs, traced.

The graph is built on the driver's machine in a child process (pipeline.models.child),
checked there against the PyTorch model on PROBE_TEXTS (every vector's cosine
>= MIN_COSINE and length within NORM_TOLERANCE), and cached (pipeline.models.cache) by
the model's fingerprint, the options that shape the graph and the library
versions. A model whose graph fails the check, or whose features are not plain
token tensors (e.g. a prompt left out of its pooling), is recorded as such in
the cache: `--backend auto` then runs PyTorch, `--backend onnx` refuses it.
With `--dtype int8` the checked graph has its MatMuls quantised
(pipeline.models.quantize) before it is cached.

The graph carries what an encoder needs besides it: the vector's length and
the tokenizer's padding (side and pad values), as ONNX metadata.

The export runs attention in its "eager" form: the default SDPA path has
data-dependent branches that tracing freezes into the graph (its vectors then
disagreed with PyTorch's, mean cosine 0.956).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings

from pipeline.models import cache
from pipeline.config import EmbedConfig
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

FEATURES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
MIN_COSINE = 0.99999
NORM_TOLERANCE = 1e-4
# The options that change the traced graph; the others (batching, I/O, pools) cannot.
_GRAPH_OPTIONS = ("model", "trust_remote_code", "pooling", "normalize", "dtype")
_LIBRARIES = ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime")
META_PREFIX = "embedpipe."


class Unsupported(Exception):
    """The model cannot run as a checked ONNX graph; the message says why."""


def onnx_runtime_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))


def require_onnxruntime(flag: str) -> None:
    if not onnx_runtime_installed():
        raise UsageError(f"{flag} needs ONNX Runtime: pip install onnx onnxruntime")


def graph_for(config: EmbedConfig, fingerprint: str, required: bool) -> bytes | None:
    """The checked ONNX graph of the model for `config` (int8 when config.dtype is), from the cache
    or built now; None when the model cannot have one and `required` is false (PyTorch runs it)."""
    flag = "--dtype int8" if config.dtype == "int8" else "--backend onnx"
    if not onnx_runtime_installed():
        if required:
            require_onnxruntime(flag)
        return None
    path = cache.entry_path("onnx", _cache_key(config, fingerprint), ".onnx")
    refused = path[: -len(".onnx")] + ".unsupported"
    data = cache.read(path)
    if data is None:
        reason = cache.read(refused)
        if reason is None:
            data, why = _build(config)
            if data is None:
                reason = why.encode()
                cache.write(refused, reason)
            else:
                cache.write(path, data)
        if data is None:
            message = f"model {config.model} has no ONNX graph that gives its vectors: {reason.decode()}"
            if required:
                raise UsageError(f"{flag}: {message}")
            log.info("%s; encoding with PyTorch", message)
    return data


def _cache_key(config: EmbedConfig, fingerprint: str) -> str:
    return json.dumps({
        "fingerprint": fingerprint, "opset": OPSET,
        **cache.versions_and_code(_LIBRARIES, ("onnx_graph.py", "quantize.py", "loading.py")),
        "options": {name: getattr(config, name) for name in _GRAPH_OPTIONS},
    }, sort_keys=True)


def _build(config: EmbedConfig) -> tuple[bytes | None, str | None]:
    """build_or_reason, in this process when it has imported sentence-transformers already (a notebook,
    a test run), else in a child whose torch and sentence-transformers are gone when it exits."""
    if "sentence_transformers" in sys.modules:
        return build_or_reason(config)
    from pipeline.models.child import ChildCall

    return ChildCall("pipeline.models.onnx_graph:build_or_reason", config, what="exporting the model to ONNX").result()


def build_or_reason(config: EmbedConfig) -> tuple[bytes | None, str | None]:
    """(graph, None), or (None, why the model has none): a verdict, returned as a value so that it
    comes back from a child process as it is (the child passes on only embedpipe's own errors)."""
    try:
        return build_graph(config), None
    except Unsupported as exc:
        return None, str(exc)


def build_graph(config: EmbedConfig) -> bytes:
    """Trace, check and (for int8) quantise the model's graph; Unsupported when it cannot be trusted."""
    import onnx
    import torch
    from sentence_transformers.base.modules import Transformer

    from pipeline.stages.batching import padding
    from pipeline.models.loading import load_model, model_normalizes, resolve_prompt

    model = load_model(config, device="cpu", weights=True).eval()
    if not len(model) or not isinstance(model[0], Transformer):
        raise Unsupported("it does not start with a Transformer module")
    prompt = resolve_prompt(model, config)
    probe = model.preprocess(["x"], prompt=prompt)
    # Values that are not tensors (the modality, a prompt's length) are the same for every batch of
    # a run: the PyTorch encoder takes them from this probe too, and the graph holds them as constants.
    extras = {k: v for k, v in probe.items() if not hasattr(v, "shape")}
    names = [n for n in FEATURES if n in probe]
    others = sorted(k for k, v in probe.items() if hasattr(v, "shape") and k not in FEATURES)
    if others or "input_ids" not in names or "attention_mask" not in names:
        raise Unsupported(f"its features are not only token tensors ({', '.join(others) or 'no input_ids'})")
    _use_eager_attention(model[0].auto_model)
    normalize = bool(config.normalize) and not model_normalizes(model)
    wrapper = _SentenceEmbedding(model, names, extras, normalize).eval()
    example = model.preprocess(["an example sentence to trace", "a second, rather longer example sentence to trace"],
                               prompt=prompt)
    with tempfile.TemporaryDirectory() as work:
        fp32 = os.path.join(work, "model.onnx")
        axes = {n: {0: "batch", 1: "tokens"} for n in names}
        try:  # tracing warns of every Python branch it freezes; the check below is what decides
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, tuple(example[n] for n in names), fp32, input_names=names, output_names=["embedding"],
                    dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=OPSET, dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - any tracing failure: the model stays on PyTorch
            raise Unsupported(f"tracing failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
        graph = onnx.load(fp32)
        left, pads = padding(model.tokenizer)
        meta = {"dim": None, "left_pad": left, "pad_values": pads, "dtype": "float32"}
        _check(model, wrapper, graph, names, prompt, meta)
        if config.dtype == "int8":
            from pipeline.models.quantize import quantize_per_token

            graph = onnx.load_from_string(quantize_per_token(fp32))
            meta["dtype"] = "int8"
        for key, value in meta.items():
            graph.metadata_props.add(key=META_PREFIX + key, value=json.dumps(value))
        onnx.checker.check_model(graph)
        return graph.SerializeToString()


def _check(model, wrapper, graph, names: list[str], prompt: str | None, meta: dict) -> None:
    """Every probe text's vector from the graph against PyTorch's, in two batches of other sizes and
    widths than the traced example, and one alone; meta['dim'] is set from them."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from pipeline.models.fast_tokenizer import PROBE_TEXTS

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]  # the exporter drops a feature the model ignores
    texts = [t for t in PROBE_TEXTS if t.strip()]
    for batch in (texts, texts[:3], texts[-1:]):  # the last: the longest text, alone
        features = model.preprocess(batch, prompt=prompt)
        with torch.inference_mode():
            expected = wrapper(*(features[n] for n in names)).float().numpy()
        (got,) = session.run(["embedding"], {n: features[n].numpy() for n in inputs})
        norms = np.linalg.norm(expected, axis=1), np.linalg.norm(got, axis=1)
        cosine = (expected * got).sum(axis=1) / np.maximum(norms[0] * norms[1], 1e-30)
        drift = np.abs(norms[1] / np.maximum(norms[0], 1e-30) - 1)
        if got.shape != expected.shape or cosine.min() < MIN_COSINE or drift.max() > NORM_TOLERANCE:
            raise Unsupported(
                f"its traced vectors differ from PyTorch's (min cosine {cosine.min():.6f}, length change {drift.max():.2e})"
            )
        meta["dim"] = int(expected.shape[1])


def _use_eager_attention(hf) -> None:
    """Eager attention: traceable without data-dependent branches frozen into the graph."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        hf.config._attn_implementation = "eager"


def _SentenceEmbedding(model, names: list[str], extras: dict, normalize: bool):
    """The SentenceTransformer's modules on positional token tensors (as tracing wants), float32 out."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            emb = self.model({**dict(zip(names, inputs)), **extras})["sentence_embedding"].float()
            return torch.nn.functional.normalize(emb, p=2, dim=1) if normalize else emb

    return SentenceEmbedding()


class OnnxEncoder:
    """Runs a graph from graph_for on padded numpy token features; imports neither torch nor
    sentence-transformers."""

    def __init__(self, graph: bytes, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        meta = {k[len(META_PREFIX):]: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(META_PREFIX)}
        self.dim: int = meta["dim"]
        self.dtype: str = meta["dtype"]
        self.left_pad: bool = meta["left_pad"]
        self.pad_values: dict[str, int] = meta["pad_values"]
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, features: dict):
        (vectors,) = self.session.run(["embedding"], {name: features[name] for name in self.inputs})
        return vectors
