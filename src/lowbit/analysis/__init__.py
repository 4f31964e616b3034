"""Layer 8: where the quantization error comes from, and what to do about it.

* ``result``: ``SensitivityReport`` / ``LayerSensitivity``, the rows every method fills;
* ``_layers``: the decision layers, choices (a preset, a config or None = float) and
  switching layers' quantizers on and off.
"""

from ._layers import (
    assignment_config,
    choice_config,
    choice_name,
    decision_layers,
    float_only,
    quantized_only,
)
from .result import LayerSensitivity, SensitivityReport

__all__ = [
    "LayerSensitivity", "SensitivityReport", "assignment_config", "choice_config", "choice_name",
    "decision_layers", "float_only", "quantized_only",
]
