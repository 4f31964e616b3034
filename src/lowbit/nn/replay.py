"""Re-running part of a traced model: every value of one full run kept, chosen nodes run again.

An analysis or search that changes one layer (or one quantizer) and wants the model's output
again needs to re-run only the nodes whose value depends on that layer; everything upstream of
it, and every branch that does not meet it, is what the full run computed::

    replayer = Replayer(graph_module)              # e.g. from lowbit.nn.trace.try_trace(qmodel)
    values = replayer.record((x,))                 # one full run, every intermediate value kept
    nodes = replayer.downstream(["features.3.conv.0.0"])
    ...                                            # change that layer
    y = replayer.final(replayer.rerun(values, nodes))   # the output, as a full run would give it

The outputs are the same tensors a full forward pass gives (the same ops on the same inputs).
Memory: every intermediate value of one recorded run (MobileNetV2, 8 photos: about 0.2 GB).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import fx


class Replayer(fx.Interpreter):
    """An fx interpreter that keeps every value of a full run and re-runs chosen nodes over it."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module, garbage_collect_values=False)
        self.order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
        self.result = next(n for n in graph_module.graph.nodes if n.op == "output")

    def record(self, args: tuple) -> dict:
        """Run the whole graph on ``args``; every node's value."""
        self.run(*args)
        return dict(self.env)

    def final(self, values: dict) -> object:
        """The model's output in recorded ``values``."""
        return values[self.result]

    def rerun(self, values: dict, nodes: Sequence[fx.Node]) -> dict:
        """Every node's value with ``nodes`` (graph order) run again over recorded ``values``
        (which are not changed; the values of the other nodes are shared with them)."""
        self.env = dict(values)
        for node in nodes:
            self.env[node] = self.run_node(node)
        return self.env

    def calls(self, name: str) -> list[fx.Node]:
        """The nodes that call the module ``name`` or a module that contains it."""
        return [n for n in self.order if n.op == "call_module" and (n.target == name or name.startswith(f"{n.target}."))]

    def downstream(self, names: str | Iterable[str]) -> list[fx.Node] | None:
        """The nodes whose value depends on the module(s) ``names`` (their calls included), in
        graph order; None when no node calls one of them or a module that contains it."""
        starts = [n for name in ([names] if isinstance(names, str) else names) for n in self.calls(name)]
        if not starts:
            return None
        seen, todo = set(starts), list(starts)
        while todo:
            for user in todo.pop().users:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        return sorted(seen, key=self.order.__getitem__)
