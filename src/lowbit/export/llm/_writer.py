"""A small ONNX graph writer: nodes, initializers and graph inputs/outputs, named uniquely.

The LLM builder writes its graph directly (no tracing), so it needs only to append nodes in
order and keep constants; ``GraphWriter`` does that and turns the lists into a ModelProto.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits, GroupQueryAttention ...)


class GraphWriter:
    """Collects a graph in execution order.

    Example::

        w = GraphWriter()
        x = w.input("x", onnx.TensorProto.FLOAT, ["batch", 8])
        y = w.node("Relu", [x], name="relu")
        w.output(y, onnx.TensorProto.FLOAT, ["batch", 8])
        model = w.model(opset=23)
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._shared: dict[tuple, str] = {}  # small constants by (dtype, value): written once

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"ONNX name {name!r} is used twice (a lowbit bug in the LLM builder)")
        self._names.add(name)
        return name

    def input(self, name: str, elem_type: int, shape: list) -> str:
        """A graph input of ``shape`` (ints for fixed sizes, strings for symbolic ones)."""
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        """Declare the value ``name`` (already produced by a node) a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer holding ``array`` (its dtype kept)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), self._claim(name)))
        return name

    def scalar(self, value, dtype) -> str:
        """A small shared constant (an axis list, a 1): written once however often it is used."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            shape = "x".join(map(str, array.shape)) or "scalar"
            flat = "_".join(map(str, array.ravel().tolist()))
            self._shared[key] = self.const(f"const/{array.dtype.name}/{shape}/{flat}", array)
        return self._shared[key]

    def node(self, op: str, inputs: list[str], *, name: str, outputs: int | list[str] = 1,
             domain: str = "", **attrs) -> str | list[str]:
        """Append ``op`` and return its output name (one output) or names (several).

        ``outputs``: a count (names ``<name>/output_<i>``) or explicit names; an empty string
        skips an optional output.  Empty strings in ``inputs`` skip optional inputs.
        """
        names = ([f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs))
        for out in names:
            if out:
                self._claim(out)
        self.nodes.append(helper.make_node(op, inputs, names, name=self._claim(name), domain=domain or None,
                                           **attrs))
        return names[0] if len(names) == 1 else names

    def model(self, *, opset: int, graph_name: str, producer: str, metadata: dict[str, str]) -> onnx.ModelProto:
        """The ModelProto at ``opset`` (plus ``com.microsoft`` version 1), IR version as ``opset`` needs."""
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, producer_name=producer,
                                  opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        helper.set_model_props(model, metadata)
        return model
