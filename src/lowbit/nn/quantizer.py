"""Quantizer: the one module per tensor that fake-quantizes it.

A quantized layer is its float layer plus one ``Quantizer`` per tensor it
quantizes (input, weight, optionally output).  The quantizer holds the
``QuantSpec``, the range estimator and the resulting ``scale`` / ``zero_point``
(in ONNX layout, so export copies them as they are).

Modes, in the order a PTQ run walks through them::

    calibrating   observe the tensor, pass it through unchanged (float)
    static        fake-quantize with the frozen scale / zero-point
    dynamic       compute the range of every tensor it sees, then fake-quantize
                  (dynamic activation quantization; weights during QAT)
    disabled      identity
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..numerics import QuantSpec, compute_qparams, fake_quantize, tensor_minmax
from ..observers import make_observer

Mode = Literal["calibrating", "static", "dynamic", "disabled"]
_MODES = ("calibrating", "static", "dynamic", "disabled")


class Quantizer(nn.Module):
    """Fake-quantizes one tensor.

    Args:
        spec: the integer grid and scale layout.
        observer: range estimator kind for calibration (see ``lowbit.observers.OBSERVERS``).
        observer_options: keyword options of that estimator (e.g. ``{"percentile": 99.9}``).
        dynamic: compute ranges from each tensor at run time instead of calibrating.
        name: the tensor's name in messages, e.g. ``"features.3.conv.0.input"``.

    Example:
        >>> q = Quantizer(UINT8_ACTIVATION, observer="percentile", name="fc.input")
        >>> q.mode = "calibrating"; _ = q(torch.rand(8, 16)); q.freeze()
        >>> y = q(torch.rand(8, 16))          # fake-quantized with the frozen scale
    """

    def __init__(
        self,
        spec: QuantSpec,
        *,
        observer: str = "minmax",
        observer_options: dict | None = None,
        dynamic: bool = False,
        name: str = "tensor",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.observer_kind = observer
        self.observer = None if dynamic else make_observer(observer, spec, name=name, **(observer_options or {}))
        # Empty until frozen; shapes follow spec.param_shape(tensor.shape).
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self._mode: Mode = "dynamic" if dynamic else "static"

    # -- mode -------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in _MODES:
            raise ValueError(f"{self.name}: mode must be one of {_MODES}, got {value!r}")
        if value == "calibrating" and self.observer is None:
            raise ValueError(f"{self.name}: a dynamic quantizer has no observer to calibrate")
        self._mode = value

    @property
    def is_frozen(self) -> bool:
        return self.scale.numel() > 0

    # -- qparams ------------------------------------------------------------------------
    def freeze(self) -> None:
        """Take scale / zero-point from the observer and switch to static mode."""
        if self.observer is None:
            raise ValueError(f"{self.name}: a dynamic quantizer has no observer to freeze")
        scale, zero_point = self.observer.qparams()
        self.set_qparams(scale, zero_point)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install a scale / zero-point (ONNX layout) and switch to static mode."""
        self.scale = scale.detach().to(torch.float32).clone()
        self.zero_point = zero_point.detach().to(torch.int32).clone()
        self._mode = "static"

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero-point used for ``x`` in the current mode."""
        if self._mode == "dynamic":
            return compute_qparams(*tensor_minmax(x, self.spec, self.name), self.spec, self.name)
        if not self.is_frozen:
            raise RuntimeError(
                f"{self.name}: quantizer has no scale yet; calibrate it (lowbit.quantize with "
                "calibration data) or set mode='dynamic'"
            )
        return self.scale, self.zero_point

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "disabled":
            return x
        if self._mode == "calibrating":
            self.observer(x)
            return x
        scale, zero_point = self.qparams_for(x)
        return fake_quantize(x, scale, zero_point, self.spec, name=self.name)

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"mode": self._mode}

    def set_extra_state(self, state: dict) -> None:
        self.mode = state["mode"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Frozen qparams have data-dependent shapes: resize before the default copy.
        for key in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + key)
            if incoming is not None:
                setattr(self, key, torch.empty_like(incoming, dtype=getattr(self, key).dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        calib = "" if self.observer is None else f", observer={self.observer_kind}"
        return f"{self.spec.describe()}, mode={self._mode}{calib}"
