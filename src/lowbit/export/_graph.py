"""A thin, mutable view of an ONNX graph for the export passes.

``onnx.GraphProto`` keeps nodes in a list and tensors by name, with no index of
who produces or consumes a value.  ``Graph`` adds those indexes and the few
edits the passes need (swap a node, drop a node, add a constant, rename a value).
Indexes are rebuilt on demand after every edit: export graphs have thousands of
nodes at most, so simplicity beats incremental bookkeeping here.

Nodes live in a Python list of detached NodeProtos while the passes run (a
protobuf repeated field copies messages on ``extend``, so references into it do
not survive a reorder); ``commit`` writes them back.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper


class Graph:
    """Producer / consumer indexes and small edits over ``model.graph``.

    Args:
        model: the ModelProto to edit in place.
        base_dir: the folder external-data tensors are read from (a model traced over 2 GiB
            keeps its constants in files there, loaded only when a pass reads them).

    Example:
        >>> g = Graph(model)
        >>> for node in g.nodes("QuantizeLinear"):
        ...     print(node.name, g.const(node.input[1]))
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir or ""
        self._nodes: list[onnx.NodeProto] = []
        for node in model.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            self._nodes.append(copy)
        self._index: tuple[dict, dict, dict] | None = None
        self._taken: set[str] | None = None  # every name ever used; only grows

    def commit(self) -> onnx.ModelProto:
        """Write the edited node list back into the model; returns the model."""
        del self.graph.node[:]
        self.graph.node.extend(self._nodes)
        return self.model

    # -- indexes ---------------------------------------------------------------------------
    def _indexes(self) -> tuple[dict, dict, dict]:
        if self._index is None:
            inits = {t.name: t for t in self.graph.initializer}
            producer = {out: n for n in self._nodes for out in n.output if out}
            consumers: dict[str, list[onnx.NodeProto]] = {}
            for n in self._nodes:
                for name in n.input:
                    if name:
                        consumers.setdefault(name, []).append(n)
            self._index = (inits, producer, consumers)
        return self._index

    def changed(self) -> None:
        """Forget the indexes (call after editing a node's inputs or outputs directly)."""
        self._index = None

    def nodes(self, op_type: str | None = None) -> list[onnx.NodeProto]:
        """Nodes in graph order, optionally only those of ``op_type`` (a snapshot list)."""
        return [n for n in self._nodes if op_type is None or n.op_type == op_type]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._indexes()[1].get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self._indexes()[2].get(name, ()))

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.graph.output)

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, or None if zero, several, or it is a graph output."""
        users = self.consumers(name)
        if len(users) != 1 or self.is_graph_output(name):
            return None
        return users[0]

    # -- constants -------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self._indexes()[0]

    def const(self, name: str) -> np.ndarray | None:
        """Value of initializer ``name`` as a numpy array, or None if it is not a constant."""
        tensor = self._indexes()[0].get(name)
        return None if tensor is None else numpy_helper.to_array(tensor, self.base_dir)

    def const_key(self, name: str) -> tuple:
        """A hashable identity of a value: initializers by content, others by name."""
        tensor = self._indexes()[0].get(name)
        if tensor is None:
            return ("value", name)
        array = numpy_helper.to_array(tensor, self.base_dir)
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        return ("const", str(array.dtype), array.shape, digest)

    def add_const(self, hint: str, array: np.ndarray) -> str:
        """Add an initializer named after ``hint`` (made unique); returns its name."""
        name = self.unique_name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        self.changed()
        return name

    def set_const(self, name: str, array: np.ndarray) -> None:
        """Replace the value of initializer ``name`` (its dtype follows ``array``)."""
        tensor = self._indexes()[0][name]
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(array), name))

    def own_const(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Give ``node.input[index]`` the value ``value``: in place when only ``node`` reads
        that initializer, else as a new initializer (others keep the old value)."""
        name = node.input[index]
        if [id(n) for n in self.consumers(name)] == [id(node)]:
            self.set_const(name, value)
        else:
            node.input[index] = self.add_const(name, value)
            self.changed()

    def unique_name(self, hint: str) -> str:
        """``hint`` or ``hint_1``, ``hint_2`` ..., unused by any value, node or initializer."""
        if self._taken is None:
            g = self.graph
            self._taken = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
            for n in self._nodes:
                self._taken.update(n.output)
                self._taken.update(n.input)
                self._taken.add(n.name)
        name, i = hint, 0
        while name in self._taken:
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    # -- edits -----------------------------------------------------------------------------
    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of ``old`` read ``new`` instead (graph outputs excluded)."""
        self.rename_inputs({old: new})

    def rename_inputs(self, mapping: dict[str, str]) -> None:
        """Node inputs named in ``mapping`` read the mapped value instead (one sweep)."""
        for n in self._nodes:
            for i, name in enumerate(n.input):
                if name in mapping:
                    n.input[i] = mapping[name]
        self.changed()

    def remove_nodes(self, doomed: list[onnx.NodeProto]) -> None:
        ids = {id(n) for n in doomed}
        self._nodes = [n for n in self._nodes if id(n) not in ids]
        self.changed()

    def replace_node(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """Put ``new`` (in order) where ``old`` was."""
        at = next(i for i, n in enumerate(self._nodes) if n is old)
        self._nodes[at : at + 1] = new
        self.changed()

    def prune(self) -> None:
        """Drop nodes whose outputs nobody reads and initializers nobody reads."""
        outputs = {v.name for v in self.graph.output}
        while True:
            used = outputs | {name for n in self._nodes for name in n.input}
            dead = [n for n in self._nodes if not any(o in used for o in n.output if o)]
            if not dead:
                break
            self.remove_nodes(dead)
        used = outputs | {name for n in self._nodes for name in n.input}
        inits = self.graph.initializer
        for i in reversed([i for i, t in enumerate(inits) if t.name not in used]):
            del inits[i]  # in place: copying the kept tensors would double a large model's memory
        self.changed()


def attr(node: onnx.NodeProto, name: str, default=None):
    """Attribute ``name`` of ``node`` as a Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or replace) attribute ``name`` of ``node``."""
    drop_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def drop_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
