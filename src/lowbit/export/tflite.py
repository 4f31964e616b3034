"""export_tflite: a quantized lowbit model -> a fully-integer TFLite / LiteRT flatbuffer.

The route (chosen by measurement; BENCHMARKS.md, TFLite section): lowbit writes the model as a
PyTorch 2 export graph in the PT2E quantized form -- ``quantized_decomposed.quantize_per_tensor``
/ ``dequantize_per_tensor`` pairs carrying lowbit's own scales and zero points, int8 weight
constants behind ``dequantize_per_channel`` (axis 0), biases already on lowbit's int32 grid --
and ``litert_torch.convert`` in its static-QDQ mode folds every ``DQ -> op -> Q`` group into an
int8 TFLite kernel (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MEAN ...): int8 weights per
output channel, int8 activations, int32 biases (``s_in * s_w``, the integers lowbit simulates).
Nothing is re-calibrated for the tensors lowbit quantizes, so the file holds lowbit's ranges
exactly.  (The other route, ``ai-edge-quantizer`` on a float ``.tflite`` fed with lowbit's
min / max, recomputes every scale from a range and re-rounds the weights; it cannot carry a
range search's or AdaRound's integers.)

TFLite's int8 activation grid is lowbit's uint8 affine grid shifted by 128 (``zero_point - 128``,
the same real numbers).  A TFLite integer kernel must also write an int8 *output* (a classifier's
logits, a Linear feeding LayerNorm).  A model quantized with ``target="tflite"`` has those output
quantizers already (``lowbit.passes.outputs``), calibrated with its own observers, so the file
rounds only where the simulation does, and differs from it only on rounding ties (TFLite
requantizes an exact int32 accumulator; the simulation rounds a float result).  For a model
quantized for another target, the outputs no lowbit quantizer reads get a range observed on
``calibration`` inputs (``example_inputs`` when none are given; ``observer``, min / max by
default), with a warning: that rounding is one the simulation never made.  Reshape / Flatten / MaxPool between a
layer and the quantizer that reads its output get that quantizer copied in front of them (exact).

litert-torch pins packages (pydantic, typing-extensions) that may clash with an environment's;
``export_tflite`` imports it when it can, and otherwise runs the conversion in the Python named by
``python=`` or ``$LOWBIT_LITERT_PYTHON`` (a venv with ``pip install litert-torch``), passing the
graph as a ``torch.export`` file.

    export_tflite(qmodel, "model.int8.tflite", x, calibration=calib_batches)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .._files import atomic_path
from ..nn import convert, is_qat_model
from ..nn.integer import IntegerBias, IntegerTensor
from ..nn.modules import QuantEmbedding, has_quantizers, is_quantized
from ..nn.quantizer import Quantizer
from ..numerics import QuantSpec
from ..observers import OBSERVERS
from . import _tflite_graph
from ._inputs import prepare_inputs

log = logging.getLogger(__name__)

PYTHON_ENV = "LOWBIT_LITERT_PYTHON"
"""Environment variable naming a Python that has ``litert-torch`` (used when this one has not)."""

_QD = torch.ops.quantized_decomposed


def _int8_grid(spec: QuantSpec, zero_point: int, name: str) -> tuple[int, int, int]:
    """(zero point, qmin, qmax) of ``spec`` on TFLite's int8 container: an unsigned grid shifts by -128."""
    if spec.bits != 8 or spec.granularity != "tensor":
        raise ValueError(f"{name}: TFLite's integer kernels take 8-bit per-tensor activations; this quantizer is "
                         f"{spec.describe()}. Use an 8-bit activation spec (lowbit's w8a8) or keep the layer float")
    shift = 0 if spec.signed else -128
    return zero_point + shift, spec.qmin + shift, spec.qmax + shift


def _activation_forward(q: Quantizer):
    """Fake-quantize as the file will: ``quantize_per_tensor -> dequantize_per_tensor`` on int8."""
    if q.mode == "dynamic":
        raise ValueError(f"{q.name}: a dynamic activation quantizer has no fixed range for TFLite's static int8 "
                         "kernels; calibrate it (lowbit.quantize with a static config such as 'w8a8')")
    scale, zero_point = q.qparams_for(torch.empty(0))
    scale = float(scale.reshape(-1)[0]) if scale.numel() == 1 else None
    if scale is None:
        raise ValueError(f"{q.name}: per-channel activation scales have no TFLite int8 kernel; use per-tensor")
    zp, qmin, qmax = _int8_grid(q.spec, int(zero_point.reshape(-1)[0]), q.name)

    def forward(x: torch.Tensor) -> torch.Tensor:
        codes = _QD.quantize_per_tensor.default(x, scale, zp, qmin, qmax, torch.int8)
        return _QD.dequantize_per_tensor.default(codes, scale, zp, qmin, qmax, torch.int8)

    return forward


def _weight_forward(ints: IntegerTensor):
    """A layer's weight as an int8 constant behind ``dequantize_per_channel`` (or per tensor)."""
    spec, name = ints.spec, ints.name
    if spec.bits != 8 or not spec.signed or not spec.symmetric or spec.granularity == "group":
        raise ValueError(f"{name}: TFLite stores int8 symmetric weights per tensor or per output channel; this "
                         f"weight is {spec.describe()}. Use lowbit.numerics.INT8_WEIGHT (the w8a8 weight spec)")
    if spec.granularity == "channel" and spec.resolved_axis(ints.values.dim(), name) != 0:
        raise ValueError(f"{name}: TFLite's per-channel weights are per output channel (axis 0); this weight is "
                         f"quantized along axis {spec.axis}")
    # Constants made here, outside the trace: litert-torch reads per-channel scales / zero points only from
    # the program's constant tensors, and folds "quantize(float constant) -> dequantize" into int8 weights.
    # The float constant is lowbit's integers times their scale, so rounding it again gives them back
    # exactly (whatever rounding made them: nearest, AdaRound, GPTQ).
    scale = ints.scale.double()
    zeros = torch.zeros(scale.shape, dtype=torch.int64)
    dims = (-1,) + (1,) * (ints.values.dim() - 1) if scale.dim() else ()
    grid = (ints.values.double() * scale.reshape(dims)).float()
    args = (spec.qmin, spec.qmax, torch.int8)

    def forward(w: torch.Tensor) -> torch.Tensor:
        if scale.dim() == 0:
            codes = _QD.quantize_per_tensor.default(grid, float(scale), 0, *args)
            return _QD.dequantize_per_tensor.default(codes, float(scale), 0, *args)
        codes = _QD.quantize_per_channel.default(grid, scale, zeros, 0, *args)
        return _QD.dequantize_per_channel.default(codes, scale, zeros, 0, *args)

    return forward


def _embedding_table(ints: IntegerTensor):
    """An embedding's table as the simulation reads it (integers times their scale), stored float: TFLite's
    int8 GATHER takes one scale per table, lowbit's tables have one per row."""
    table = (ints.values.double() - ints.zero_point.double().reshape(-1, 1)) * ints.scale.double().reshape(-1, 1) \
        if ints.scale.dim() else (ints.values.double() - float(ints.zero_point)) * float(ints.scale)
    table = table.float()
    log.warning("%s: int8 table with a scale per row kept as float (its dequantized values) in the .tflite",
                ints.name)
    return lambda w: table


def _bias_forward(ints: IntegerBias | None):
    """The bias as the simulation adds it (``int32 * s_in * s_w``), a constant; None: keep the float one."""
    if ints is None:
        return None
    value = ints.values.to(torch.float32) * ints.scale
    return lambda: value


@contextlib.contextmanager
def litert_mode(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s quantizers trace to PT2E quantize / dequantize ops on TFLite's int8
    grid (instance attributes, removed afterwards); yields how many tensors were patched.

    Raises:
        ValueError: a quantizer TFLite's static int8 kernels cannot express (named, with the fix).
    """
    patches: list[tuple[nn.Module, str]] = []
    view = functools.cache(lambda layer: layer.integer_params())  # (weight and bias read it: compute once)

    def patch(module: nn.Module, attribute: str, value) -> None:
        if value is not None:
            setattr(module, attribute, value)
            patches.append((module, attribute))

    try:
        for module in model.modules():
            if not has_quantizers(module):
                continue
            weight_q = getattr(module, "weight_quantizer", None) if is_quantized(module) else None
            for _, q in module.quantizers():
                patch(q, "forward", _quantizer_forward(module, q, weight_q, view))
            if weight_q is not None and weight_q.mode != "disabled":
                patch(module, "_quant_bias", _bias_forward(view(module).bias))
        yield len(patches)
    finally:
        for module, attribute in reversed(patches):
            module.__dict__.pop(attribute, None)


def _quantizer_forward(module: nn.Module, q: Quantizer, weight_q: Quantizer | None, view):
    """The export-time forward of one quantizer of ``module``, or None to keep its own (disabled)."""
    if q.mode == "disabled":
        return None
    if q.mode == "calibrating" or (q.mode != "dynamic" and not q.has_range):
        raise ValueError(f"{q.name}: quantizer has no fixed range (mode {q.mode!r}); calibrate and freeze it "
                         "first (lowbit.quantize does)")
    if q is not weight_q:
        return _activation_forward(q)
    if isinstance(module, QuantEmbedding):
        return _embedding_table(view(module).weight)
    forward, shape = _weight_forward(view(module).weight), tuple(module.weight.shape)

    def weight_forward(x: torch.Tensor) -> torch.Tensor:
        # (torch.export swaps parameters for fake tensors, so the weight is recognised by its shape)
        if tuple(x.shape) != shape:
            raise ValueError(f"{q.name}: weight quantizer applied to a tensor of shape {tuple(x.shape)}, not its "
                             f"layer's weight {shape}; TFLite export folds only the layer's own weight")
        return forward(x)

    return weight_forward


def _litert_convert(module, args, out, quantized):
    """Convert ``module`` with litert-torch and write ``out`` (this function's source also runs as the
    subprocess script, so it imports only torch and litert_torch)."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config

    config = None
    if quantized:  # the quantizer itself is not run: its static config selects the converter's QDQ -> int8 mode
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
        config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    for m in module.modules():  # (torch.export's modules refuse .eval(); the flag only silences a warning)
        m.training = False
    litert_torch.convert(module, tuple(args), quant_config=config).export(str(out))


_SCRIPT = "import litert_torch  # first: a Python without it fails at once\n" + inspect.getsource(_litert_convert) + """
import sys
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops the program uses
program, example, out, quantized = sys.argv[1:5]
_litert_convert(torch.export.load(program).module(), torch.load(example), out, quantized == "1")
"""


def _missing_litert() -> ModuleNotFoundError:
    return ModuleNotFoundError(
        "export_tflite needs litert-torch: pip install litert-torch (or lowbit[tflite]). Where it cannot share "
        f"this environment's packages, install it in its own venv and pass python=<that venv's python> or set "
        f"{PYTHON_ENV}", name="litert_torch")


def _convert(module: nn.Module, args: tuple, out: Path, quantized: bool, python: str | None) -> None:
    """Run litert-torch here when it imports (and no ``python`` is named), else in ``python``."""
    if python is None and importlib.util.find_spec("litert_torch") is not None:
        _litert_convert(module, args, out, quantized)
        return
    python = python or os.environ.get(PYTHON_ENV)
    if not python:
        raise _missing_litert()
    with tempfile.TemporaryDirectory(prefix="lowbit-tflite-") as folder:
        program, example = Path(folder, "program.pt2"), Path(folder, "args.pt")
        torch.export.save(torch.export.export(module, args, strict=False), program)
        torch.save(args, example)
        done = subprocess.run([python, "-c", _SCRIPT, str(program), str(example), str(out), str(int(quantized))],
                              check=False, capture_output=True, text=True)
    if done.returncode != 0:
        if "No module named 'litert_torch'" in done.stderr:
            raise _missing_litert()
        raise RuntimeError(f"litert-torch conversion failed in {python}:\n{done.stderr[-4000:]}")


def _batches(calibration, names: list[str], default: tuple) -> list[tuple[torch.Tensor, ...]]:
    """Calibration inputs as tuples of positional tensors (dicts ordered as the example's keys)."""
    if calibration is None:
        return [default]
    out = []
    for item in calibration:
        if isinstance(item, torch.Tensor):
            out.append((item,))
        elif isinstance(item, Mapping):
            out.append(tuple(item[n] for n in names))
        elif isinstance(item, (tuple, list)):
            out.append(tuple(item))
        else:
            raise TypeError(f"calibration: each item must be a tensor, a tuple of tensors or a dict like "
                             f"example_inputs, got {type(item).__name__}")
    return out


def litert_program(qmodel: nn.Module, example_inputs, *, calibration=None,
                   observer: str = "minmax") -> tuple[torch.fx.GraphModule, tuple]:
    """The graph litert-torch converts: ``qmodel`` traced by ``torch.export`` in ``litert_mode``, every integer
    op given an int8 output (``_tflite_graph``); returns it and its positional example tensors."""
    if is_qat_model(qmodel):  # fold BatchNorms, fix learned / observed ranges: on a copy
        qmodel = convert(qmodel)
    inputs = prepare_inputs(qmodel, example_inputs, input_names=None, dynamic_batch=False, dynamic_axes=None)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), litert_mode(inputs.module) as patched:
            program = torch.export.export(inputs.module, inputs.args, strict=False)
    finally:
        qmodel.train(was_training)
    gm = program.module()
    if patched:
        batches = _batches(calibration, inputs.names, inputs.args)
        placement = _tflite_graph.place_output_quantizers(gm, batches, int(inputs.args[0].shape[0]), observer)
        log.info("tflite graph: %d quantized tensors, %d quantizers copied before data movement, %d outputs "
                 "calibrated", patched, len(placement.copied), len(placement.calibrated))
    return gm, inputs.args


def export_tflite(qmodel: nn.Module, path: str | os.PathLike, example_inputs, *,
                  calibration: Iterable | None = None, observer: str = "minmax",
                  python: str | os.PathLike | None = None) -> Path:
    """Write ``qmodel`` as a TFLite / LiteRT flatbuffer: fully integer for a lowbit W8A8 model.

    Args:
        qmodel: a model from ``lowbit.quantize`` / ``lowbit.prepare_qat`` with 8-bit static activations and
            int8 symmetric weights (per tensor or per output channel); a model without quantizers is
            written as a float ``.tflite`` (the FP32 reference).
        path: the ``.tflite`` file, written atomically (parent folders created).
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors; their shapes are the
            file's (static) input shapes.  Image inputs stay NCHW: the file transposes inside.
        calibration: inputs (items like ``example_inputs``; batch sizes a multiple of its batch) over
            which the ranges of outputs that no lowbit quantizer reads are observed (min / max).
            None: ``example_inputs`` alone.
        observer: how those ranges are estimated (``lowbit.observers.OBSERVERS``; "minmax" is what LiteRT's
            own converters do).
        python: a Python interpreter with ``litert-torch`` to run the conversion in (default: this one if
            it imports litert_torch, else ``$LOWBIT_LITERT_PYTHON``).

    Returns:
        The path written.

    Raises:
        ValueError: a quantizer TFLite's int8 kernels cannot express (named, with the fix).
        ModuleNotFoundError: litert-torch is nowhere to be found (the message says how to install it).

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8")
        >>> export_tflite(qmodel, "model.int8.tflite", calib[0][:1], calibration=calib)
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer {observer!r} is unknown; kinds: {', '.join(OBSERVERS)}")
    path = Path(path)
    gm, args = litert_program(qmodel, example_inputs, calibration=calibration, observer=observer)
    quantized = any(n.target is _QD.quantize_per_tensor.default for n in gm.graph.nodes)
    with atomic_path(path) as tmp:
        _convert(gm, args, tmp, quantized, None if python is None else os.fspath(python))
    log.info("exported %s (%s)", path, "int8" if quantized else "float")
    return path
