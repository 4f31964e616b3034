"""Decoder-only LMs (Llama family) as one ONNX graph with a KV cache, in ONNX Runtime's fastest CPU ops.

    qmodel = lowbit.quantize(model, None, "w4a16-g128")        # weight-only, HF model stays usable
    export_llm(qmodel, "lm.int4.onnx")                           # MatMulNBits + GroupQueryAttention
    ids = generate(load_session("lm.int4.onnx"), prompt_ids, max_new_tokens=32)   # greedy, with the cache

Modules: ``export`` (the entry point), ``_family`` (the per-family table of where modules are),
``_linear`` (MatMulNBits packing), ``_layers`` (embedding, norms, attention, MLP), ``generate``
(an ONNX Runtime session, prefill and decode steps, a KV cache written in place, greedy decoding).
"""

from ._family import FAMILIES, Family
from .export import build_llm, count_ops, export_llm
from .generate import SharedCache, generate, load_session, run_step

__all__ = ["FAMILIES", "Family", "SharedCache", "build_llm", "count_ops", "export_llm", "generate", "load_session",
           "run_step"]
