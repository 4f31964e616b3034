"""Post-training quantization driver: run the algorithms, swap layers, calibrate, freeze.

    qmodel = lowbit.quantize(model, calib, "w8a8", algorithms=[CLE(), SmoothQuant(alpha=0.8), BiasCorrection()])

* ``steps``: the PTQ algorithms as ordered, serialisable steps, and their registry;
* ``range_search``: activation ranges chosen by the model's output error (the ``RangeSearch`` step);
* ``adaround``: AdaRound, the weights' rounding chosen layer by layer (the ``AdaRound`` step);
* ``gptq``: GPTQ on one weight; ``_blocks`` / ``_gptq_layers``: its driver, causal LMs block by block;
* ``awq``: AWQ on the float model, block by block (its searches in ``_awq_search``);
  ``weight_steps``: the ``GPTQ`` and ``AWQ`` steps, ``RTN``, which names round to nearest, and
  ``TieEmbedding`` (``tie``: the token embedding reads the head's quantized table);
* ``_parse``: the short forms of steps (``"cle,smoothquant(alpha=0.8)"``) and quantize's flags;
* ``_quantize``: ``quantize`` (the pipeline) and ``rebuild`` (its replay without data);
* ``_layers``: residual adds and pool inputs (resolved through the config's rules), layer swap;
* ``_calibrate``: observing activations and freezing quantizers.
"""

from ..nn.walk import iter_quantizers, quantizers_by_role, run_model
from ._calibrate import as_batches, calibrate, calibrate_activations, check_has_data
from ._layers import insert_graph_quantizers, swap_layers
from ._parse import parse_step, parse_steps, resolve_algorithms
from ._quantize import QuantSummary, quantize, read_output_quantizers, rebuild
from .steps import (
    CLE,
    STEPS,
    AdaRound,
    BiasCorrection,
    FoldBatchNorm,
    RangeSearch,
    SmoothQuant,
    Step,
    StepContext,
    register_step,
)
from .weight_steps import AWQ, GPTQ, RTN, TieEmbedding

__all__ = [
    "AWQ",
    "CLE",
    "GPTQ",
    "RTN",
    "STEPS",
    "AdaRound",
    "BiasCorrection",
    "FoldBatchNorm",
    "QuantSummary",
    "RangeSearch",
    "SmoothQuant",
    "Step",
    "StepContext",
    "TieEmbedding",
    "as_batches",
    "calibrate",
    "calibrate_activations",
    "check_has_data",
    "insert_graph_quantizers",
    "iter_quantizers",
    "parse_step",
    "parse_steps",
    "quantize",
    "quantizers_by_role",
    "read_output_quantizers",
    "rebuild",
    "register_step",
    "resolve_algorithms",
    "run_model",
    "swap_layers",
]
