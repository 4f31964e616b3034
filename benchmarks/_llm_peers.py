"""Pieces of ``bench_llm_peers.py``: lowbit's and the peers' INT4 weight quantizers on one LLM, each
scored on the same token windows, in PyTorch (simulation) or in ONNX Runtime (an exported file).

* ``ort_perplexity``: a file from ``lowbit.export.export_llm`` (or a peer's rewrite of one), each
  window one prefill from an empty KV cache (``lowbit.export.llm.run_step``), scored like
  ``lowbit.report.perplexity`` (``window_nll``: exp of the mean next-token NLL over all windows).
* ``ort_quantize``: ONNX Runtime's ``MatMulNBitsQuantizer`` (default RTN, HQQ, GPTQ) on the FP32
  file that ``export_llm`` writes from the float model.  It rewrites every ``MatMul`` whose weight
  is an initializer; the tied ``lm_head`` reads the embedding table through a ``Transpose`` and
  the embedding is a ``Gather``, so both stay float, as in ORT's own LLM recipes.
* ``nncf_compress``: NNCF's ``compress_weights`` on the PyTorch model (NNCF keeps the embedding
  and the last layer at its backup precision, int8 asymmetric per channel, by default).
* ``lowbit_config``: lowbit's grid on every Linear (``lm_head`` too, the embedding int8), or on the
  decoder blocks only (``lm_head`` and embedding float: what ORT's quantizer covers).

Sizes are of what would be deployed: the ONNX file's bytes, or for NNCF the bytes of its compressed
state dict (packed codes, fp16 scales, float tensors; a tied tensor counted once).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.export.llm import load_session, run_step
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.report.perplexity import window_nll

COVERAGE = {"all": "every Linear incl. lm_head on the grid; embedding int8 per row",
            "decoder": "decoder Linears; lm_head and embedding float"}


@dataclasses.dataclass
class Row:
    """One method's measurement: perplexity where it was scored (None: not scored there)."""

    method: str
    weights: str  # which weights it quantized, and how
    ppl_torch: float | None = None
    ppl_ort: float | None = None
    size_mb: float | None = None
    wall_s: float | None = None  # quantization only
    cpu_s: float | None = None  # process CPU time of the quantization, all threads
    peak_gib: float | None = None  # peak resident memory of the process while it quantized
    calib: int = 0  # calibration windows it read


def save_row(row: Row, path: Path) -> None:
    """Append ``row`` to the JSON-lines file ``path`` (a long run keeps what it measured)."""
    with open(path, "a") as f:
        f.write(json.dumps(dataclasses.asdict(row)) + "\n")


def load_rows(path: Path) -> list[Row]:
    """The rows ``save_row`` appended to ``path`` (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return list({r.method: r for r in rows}.values())  # a method measured again: its latest row


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float, float]:
    """``fn(*args, **kwargs)``, its wall seconds and the process CPU seconds it used (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


# -- scoring ---------------------------------------------------------------------------------------

def ort_perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """Perplexity of the ``export_llm``-layout file ``path`` on ``windows`` ``(n, T)``: each window one
    prefill from an empty cache, exp of the mean next-token NLL over every window's ``T - 1`` tokens."""
    session = load_session(path, threads=threads)
    total = 0.0
    for window in windows:
        ids = window[None]
        logits, _ = run_step(session, ids.numpy())
        total += float(window_nll(torch.from_numpy(logits), ids).sum())
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def file_mb(path: str | Path) -> float:
    """Size of an ONNX file plus its external data file, if any, in MB (1e6 bytes)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def state_dict_mb(model: nn.Module) -> float:
    """Bytes of ``model``'s state dict (parameters and buffers, a shared storage counted once), in MB."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total / 1e6


# -- lowbit ----------------------------------------------------------------------------------------

def lowbit_config(bits: int, coverage: str, group: int = 128, *, signed_scale: bool = True) -> QuantConfig:
    """Signed symmetric ``bits``-bit weights in groups of ``group`` along the input dimension (each
    group's largest-magnitude value on ``qmin``, as the presets and ONNX Runtime's quantizer), on the
    layers ``coverage`` names (``COVERAGE``): "all" (the ``w{bits}a16-g{group}`` preset's layout) or
    "decoder" (``lm_head`` and the embedding left float, as ONNX Runtime's quantizer leaves them).
    ``signed_scale=False``: scale = max |w| / ((qmax - qmin) / 2) instead (lowbit's grid before)."""
    if coverage not in COVERAGE:
        raise ValueError(f"lowbit_config: coverage must be one of {list(COVERAGE)}, got {coverage!r}")
    spec = QuantSpec(bits=bits, signed_scale=signed_scale, granularity="group", axis=1, group_size=group)
    layer = LayerQuant(weight=TensorQuant(spec=spec))
    if coverage == "all":
        int8_rows = QuantSpec(bits=8, granularity="channel", axis=0)
        rules = (Rule(pattern="type:Embedding", layer=LayerQuant(weight=TensorQuant(spec=int8_rows))),)
    else:
        rules = (Rule(pattern="lm_head", layer=None), Rule(pattern="type:Embedding", layer=None))
    return QuantConfig(name=f"w{bits}a16-g{group}-{coverage}", rules=rules, default=layer)


# -- ONNX Runtime's MatMulNBits quantizer ----------------------------------------------------------

class WindowReader:
    """ONNX Runtime ``CalibrationDataReader`` for an ``export_llm`` graph: one feed per calibration
    window (``input_ids`` (1, T), an all-ones mask, an empty KV cache).  Re-iterable copies: ORT's
    GPTQ deep-copies the reader before reading it."""

    def __init__(self, windows: torch.Tensor, fp32_path: str | Path) -> None:
        model = onnx.load(str(fp32_path), load_external_data=False)
        self.past = {}
        for i in model.graph.input:
            if i.name.startswith("past_key_values."):
                dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
                self.past[i.name] = (dims[1], dims[3])  # kv_heads, head_dim
        self.windows, self.index = windows, 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.windows):
            return None
        ids = self.windows[self.index : self.index + 1].numpy()
        self.index += 1
        past = {n: np.zeros((1, h, 0, d), np.float32) for n, (h, d) in self.past.items()}
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def rewind(self) -> None:
        self.index = 0


def _ort_algo_config(algorithm: str, reader: WindowReader | None, block: int):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algorithm == "default":
        return None  # MatMulNBitsQuantizer builds DefaultWeightOnlyQuantConfig from its own arguments
    if algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    if algorithm == "gptq":
        if reader is None:
            raise ValueError("ort_quantize: algorithm 'gptq' needs calibration windows (a WindowReader)")
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
    raise ValueError(f"ort_quantize: algorithm must be 'default', 'hqq' or 'gptq', got {algorithm!r}")


def ort_quantize(fp32_path: str | Path, out_path: str | Path, algorithm: str, *, block: int = 128,
                 accuracy_level: int = 4, calib: torch.Tensor | None = None) -> onnx.ModelProto:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` on ``fp32_path`` (4 bits, blocks of ``block``,
    symmetric where the algorithm offers it: default and GPTQ; HQQ always fits zero points), written
    to ``out_path``.  Every MatMulNBits gets ``accuracy_level`` (HQQ's path sets none itself), so
    all files run the same kernels.  ``calib``: ``(n, T)`` windows for GPTQ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    reader = None if calib is None else WindowReader(calib, fp32_path)
    model = onnx.load(str(fp32_path))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True,
                                     accuracy_level=accuracy_level,
                                     algo_config=_ort_algo_config(algorithm, reader, block))
    quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    set_accuracy_level(out, accuracy_level)
    onnx.save(out, str(out_path))
    return out


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Set ``accuracy_level`` on every MatMulNBits node of ``model`` (in place)."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


def onnx_coverage(model: onnx.ModelProto) -> str:
    """Which MatMuls a quantized ``export_llm``-layout graph holds in 4 bits and which stayed float."""
    inits = {i.name for i in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    float_mm = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    zero_points = sum(len(n.input) > 3 and n.input[3] in inits for n in nbits)
    bits = Counter(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    text = f"{len(nbits)} MatMulNBits ({', '.join(f'{k}-bit x{v}' for k, v in sorted(bits.items()))}"
    text += f", {zero_points} with zero points)" if zero_points else ", symmetric)"
    shown = ", ".join(sorted(float_mm)[:3]) + (" ..." if len(float_mm) > 3 else "")
    gathers = sum(n.op_type == "Gather" for n in model.graph.node)
    return text + (f"; float MatMul: {shown}" if float_mm else "") + ("; embedding float" if gathers else "")


# -- NNCF ------------------------------------------------------------------------------------------

def nncf_compress(model: nn.Module, calib: torch.Tensor, *, ratio: float = 1.0, group: int = 128,
                  hessian: bool = False, awq: bool = False, scale_estimation: bool = False) -> nn.Module:
    """NNCF ``compress_weights`` (int4 symmetric, groups of ``group``) on a copy of ``model``, on the
    ``ratio`` of the weights its criterion picks (the rest int8 asymmetric per channel); the
    calibration windows ``calib`` ``(n, T)`` feed its tracing and its data-aware methods (the
    ``HESSIAN_INPUT_ACTIVATION`` criterion with ``hessian``, ``awq``, ``scale_estimation``).

    NNCF refuses a group that does not divide a layer's input width (SmolLM2's 576 = 4.5 x 128;
    lowbit and ORT give such a layer a shorter last group); ``ADJUST`` gives those layers the largest
    power of two dividing it (64 for 576: twice the scales, a finer grid than lowbit's or ORT's)."""
    import nncf

    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    metric = nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION if hessian else None
    return nncf.compress_weights(
        copy.deepcopy(model), mode=nncf.CompressWeightsMode.INT4_SYM, ratio=ratio, group_size=group,
        dataset=dataset, sensitivity_metric=metric, subset_size=len(calib),
        awq=awq, scale_estimation=scale_estimation, advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))


def nncf_coverage(original: nn.Module, compressed: nn.Module) -> str:
    """Bits per weight of each compressed layer (from its packed uint8 codes' size), counted."""
    numel = {name: p.numel() for name, p in original.named_parameters(remove_duplicate=False)}
    bits = Counter()
    for name, tensor in compressed.state_dict().items():
        if name in numel and tensor.dtype == torch.uint8:
            bits[round(8 * tensor.numel() / numel[name])] += 1
    left = sum(1 for n, t in compressed.state_dict().items() if n in numel and t.is_floating_point() and t.dim() == 2)
    parts = [f"int{b} x{c}" for b, c in sorted(bits.items())]
    return ", ".join(parts) + (f"; {left} 2-D weights float" if left else "") + " (int8 asymmetric per channel)"


def names_of(rows: Sequence[Row]) -> list[str]:
    return [r.method for r in rows]
