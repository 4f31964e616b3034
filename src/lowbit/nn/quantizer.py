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

and the two QAT modes (``lowbit.prepare_qat`` sets them)::

    observing     in training mode, fold each tensor into the observer and fake-quantize
                  with the range observed so far (torch.ao's "observer + fake-quant");
                  in eval mode, fake-quantize with the last range, observing nothing
    learned       fake-quantize with ``scale`` (and, for LSQ+, ``zero_point``) as trainable
                  Parameters, gradients by LSQ (Esser et al. 2020; Bhalgat et al. 2020); or,
                  ``learn="rescale"``, the codes of the frozen grid (``anchor``) times a learned
                  scale (for weights PTQ wrote onto their grid: see ``fake_quantize``'s anchor)

A learnable quantizer (``make_learnable``) that has no range yet observes its first
training batch, takes that range as the initial value of its Parameters, then
switches to ``learned`` by itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..numerics import QuantSpec, compute_qparams, fake_quantize, tensor_minmax
from ..observers import make_observer

Mode = Literal["calibrating", "observing", "static", "learned", "dynamic", "disabled"]
_MODES = ("calibrating", "observing", "static", "learned", "dynamic", "disabled")
Learn = Literal["lsq", "lsq+", "rescale"]
_MIN_SCALE = 1e-10  # a learned scale is used as |scale| clamped here, so a step that
# overshoots zero cannot produce a negative or zero step size


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

    # Called as ``observe_hook(observer, x)`` instead of ``observer(x)`` in mode "observing"
    # (training): it must fold ``x`` into ``observer``.  None (the default) folds it directly;
    # ``lowbit.qat.distributed`` installs one that makes every rank fold the statistics of the
    # global batch.  Not part of the saved state.
    observe_hook = None

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
        self.learn: Learn | None = None
        self._needs_init = False  # learnable, waiting for its first training batch

    # -- mode -------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in _MODES:
            raise ValueError(f"{self.name}: mode must be one of {_MODES}, got {value!r}")
        if value in ("calibrating", "observing") and self.observer is None:
            raise ValueError(f"{self.name}: a dynamic quantizer has no observer for mode {value!r}")
        if value == "learned" and (self.learn is None or self._needs_init):
            raise ValueError(f"{self.name}: mode 'learned' needs make_learnable() and an initial range "
                             "(calibrate first, or let the quantizer observe one training batch)")
        self._mode = value

    @property
    def is_frozen(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_range(self) -> bool:
        """True when the scale / zero-point are known before a tensor arrives (frozen, and not a
        learnable quantizer still waiting for its first training batch)."""
        return self.is_frozen and not self._needs_init

    # -- qparams ------------------------------------------------------------------------
    def freeze(self) -> None:
        """Take scale / zero-point from the observer and switch to static mode."""
        if self.observer is None:
            raise ValueError(f"{self.name}: a dynamic quantizer has no observer to freeze")
        scale, zero_point = self.observer.qparams()
        self.set_qparams(scale, zero_point)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install a scale / zero-point (ONNX layout) and switch to static mode
        (``learned`` for a learnable quantizer, whose Parameters take the values in place)."""
        self._install(scale, zero_point)
        self._needs_init = False
        self._mode = "static" if self.learn is None else "learned"

    def _install(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if isinstance(self.scale, nn.Parameter):  # keep the Parameter objects an optimizer holds
            if tuple(scale.shape) != tuple(self.scale.shape):
                raise ValueError(f"{self.name}: learned scale has shape {tuple(self.scale.shape)}, "
                                 f"the new range {tuple(scale.shape)}")
            with torch.no_grad():  # (no copy when unchanged: a tied quantizer may have used it already)
                if not torch.equal(self.scale, scale.to(self.scale.dtype)):
                    self.scale.copy_(scale)
                if not torch.equal(self.zero_point, zero_point.to(self.zero_point.dtype)):
                    self.zero_point.copy_(zero_point.to(self.zero_point.dtype))
            return
        self.scale = scale.detach().to(torch.float32).clone()
        self.zero_point = zero_point.detach().to(torch.int32).clone()

    def make_learnable(self, *, offset: bool = False, shape: tuple[int, ...] | None = None,
                       rescale: bool = False) -> None:
        """Turn ``scale`` (and, with ``offset`` on an affine grid, ``zero_point``: LSQ+) into
        trainable Parameters, in place, so an optimizer built afterwards trains them.

        Args:
            offset: learn the zero-point too (LSQ+); ignored for symmetric grids, whose
                zero-point is 0 by definition.
            shape: the scale layout (``spec.param_shape(tensor.shape)``) when the quantizer
                has no range yet; its Parameters start at 1 / 0 and take the range of the
                first training batch (mode ``observing`` until then).
            rescale: keep the current scale as ``anchor``, which fixes the codes
                (``round(x / anchor)``), and learn a scale that multiplies them
                (``learn="rescale"``; not with ``offset``).
        """
        if rescale and offset:
            raise ValueError(f"{self.name}: rescale learns the scale of fixed codes; it has no learned offset")
        if self.learn is not None:
            raise ValueError(f"{self.name}: quantizer is already learnable ({self.learn})")
        if self._mode == "dynamic" or self.observer is None:
            raise ValueError(f"{self.name}: a dynamic quantizer computes its range from every tensor; "
                             "it has nothing to learn")
        if not self.is_frozen and shape is None:
            raise ValueError(f"{self.name}: give the scale shape, or calibrate before make_learnable()")
        frozen = self.is_frozen
        scale = self.scale.detach().clone() if frozen else torch.ones(shape)
        zero_point = self.zero_point.detach().clone() if frozen else torch.zeros(shape, dtype=torch.int32)
        offset = offset and not self.spec.symmetric
        del self.scale, self.zero_point  # buffers -> Parameter / buffer of the learned kinds
        self.scale = nn.Parameter(scale.float())
        if offset:
            self.zero_point = nn.Parameter(zero_point.float())
        else:
            self.register_buffer("zero_point", zero_point.to(torch.int32))
        if rescale:
            self.register_buffer("anchor", scale.float().clone())
        self.learn = "rescale" if rescale else "lsq+" if offset else "lsq"
        self._mode = "learned" if frozen else "observing"
        self._needs_init = not frozen

    def to_static(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the range at ``scale`` / ``zero_point`` as plain buffers (a learnable quantizer stops
        learning; its Parameters are dropped): what PTQ tools and export expect."""
        if self.learn is not None:
            del self.scale, self.zero_point
            if self.learn == "rescale":
                del self.anchor
            self.register_buffer("scale", torch.empty(0))
            self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
            self.learn = None
        self.set_qparams(scale.detach(), zero_point.detach())

    def _learned_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable scale / zero-point of a learned quantizer (a ``signed_scale`` spec keeps
        each scale's sign, which its start gave it; a magnitude is learned)."""
        magnitude = self.scale.abs().clamp_min(_MIN_SCALE)
        if self.spec.signed_scale:
            return torch.where(self.scale < 0, -magnitude, magnitude), self.zero_point
        return magnitude, self.zero_point

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero-point used for ``x`` in the current mode (plain tensors, integer zero-point)."""
        if self._mode == "dynamic":
            return compute_qparams(*tensor_minmax(x, self.spec, self.name), self.spec, self.name)
        if self._needs_init or not self.is_frozen:
            raise RuntimeError(
                f"{self.name}: quantizer has no scale yet; calibrate it (lowbit.quantize with "
                "calibration data), train it for a step (QAT), or set mode='dynamic'"
            )
        if self.learn is not None:
            with torch.no_grad():
                scale, zp = self._learned_qparams()
                if zp.is_floating_point():  # LSQ+: the forward pass rounds it the same way
                    zp = torch.round(zp).clamp(self.spec.qmin, self.spec.qmax)
            return scale.detach().clone(), zp.to(torch.int32)
        return self.scale, self.zero_point

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "disabled":
            return x
        if self._mode == "calibrating":
            self.observer(x)
            return x
        if self._mode == "observing" and self.training:
            if self.observe_hook is None:
                self.observer(x.detach())
            else:  # e.g. lowbit.qat.distributed: fold in the statistics of the batch on every rank
                self.observe_hook(self.observer, x.detach())
            self._install(*self.observer.qparams())
            if self.learn is not None:  # initialised from its first batch: learn from now on
                if self.learn == "rescale":
                    self.anchor.copy_(self.scale.detach())
                self._needs_init = False
                self._mode = "learned"
                return self._learned_forward(x)
        if self._mode == "learned":
            return self._learned_forward(x)
        scale, zero_point = self.qparams_for(x)
        return fake_quantize(x, scale, zero_point, self.spec, name=self.name)

    def _learned_forward(self, x: torch.Tensor) -> torch.Tensor:
        anchor = self.anchor if self.learn == "rescale" else None
        return fake_quantize(x, *self._learned_qparams(), self.spec, learned=True, anchor=anchor, name=self.name)

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"mode": self._mode, "learn": self.learn, "needs_init": self._needs_init}

    def set_extra_state(self, state: dict) -> None:
        learn = state.get("learn")
        if learn != self.learn:
            raise ValueError(f"{self.name}: the saved quantizer is {'learnable (' + learn + ')' if learn else 'not learnable'}"
                             f" but this one is {'learnable (' + self.learn + ')' if self.learn else 'not learnable'}; "
                             "prepare the model with the same config and learn= option as the saved one")
        self._needs_init = bool(state.get("needs_init", False))
        self._mode = state["mode"] if state["mode"] in _MODES else self.mode

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Frozen qparams have data-dependent shapes: resize before the default copy
        # (Parameters keep their object, and their shape is fixed by make_learnable).
        for key in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + key)
            current = getattr(self, key)
            if incoming is not None and not isinstance(current, nn.Parameter):
                setattr(self, key, torch.empty_like(incoming, dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        calib = "" if self.observer is None else f", observer={self.observer_kind}"
        learn = "" if self.learn is None else f", learn={self.learn}"
        return f"{self.spec.describe()}, mode={self._mode}{calib}{learn}"
