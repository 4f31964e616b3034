"""torch.fx tracing that keeps lowbit's quantized layers opaque."""

from __future__ import annotations

from torch import fx, nn

from .modules import has_quantizers
from .registry import registered


class QuantAwareTracer(fx.Tracer):
    """fx's default tracer, but lowbit's quantized layers and QuantAdd stay opaque calls:
    their quantizers branch on their mode and need a scale, which tracing cannot give them,
    and a pass run twice must not look inside what it (or layer swapping) already made.
    Registered float layer kinds (``lowbit.nn.register``) stay whole too, as torch.nn's own
    layers do: the passes look for them as modules, and swapping replaces them as modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (has_quantizers(m) or type(m) in registered()
                or super().is_leaf_module(m, module_qualified_name))


def try_trace(module: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph_module, "")`` if ``torch.fx`` can trace ``module``, else ``(None, why)``.

    Like ``fx.symbolic_trace``; the GraphModule shares ``module``'s layers.
    """
    try:
        graph = QuantAwareTracer().trace(module)
        return fx.GraphModule(module, graph, type(module).__name__), ""
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, ... from user code
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first_line[:200]}"
