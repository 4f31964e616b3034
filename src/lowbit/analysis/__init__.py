"""Layer 8: where the quantization error comes from, and what to do about it.

* ``result``: ``SensitivityReport`` / ``LayerSensitivity``, the rows every method fills;
* ``_layers``: the decision layers, choices (a preset, a config or None = float) and
  switching layers' quantizers on and off.
* ``autoquant``: the ladder PTQ -> ranges -> algorithms -> selective -> mixed -> QAT;
* ``metrics``: ``agreement``, an eval_fn from fidelity to FP32 when there are no labels;
* ``sensitivity``: per-layer cost of a choice, by output SQNR, ablation or Hessian trace, or for
  causal LMs by the output error from one streamed pass of the blocks (``_llm_sensitivity``).
* ``mixed``: ``mixed_precision``, a choice per layer under a budget (an integer program), its front.
"""

from ._autoquant import RUNGS, AutoQuantResult, Rung, autoquant
from ._layers import (
    assignment_config,
    choice_config,
    choice_name,
    decision_layers,
    float_only,
    quantized_only,
)
from ._sensitivity import sensitivity
from .metrics import agreement
from .mixed import FrontPoint, MixedPrecisionResult, mixed_precision
from .result import LayerSensitivity, SensitivityReport

__all__ = [
    "RUNGS",
    "AutoQuantResult",
    "FrontPoint",
    "LayerSensitivity",
    "MixedPrecisionResult",
    "Rung",
    "SensitivityReport",
    "agreement",
    "assignment_config",
    "autoquant",
    "choice_config",
    "choice_name",
    "decision_layers",
    "float_only",
    "mixed_precision",
    "quantized_only",
    "sensitivity",
]
