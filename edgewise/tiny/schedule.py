"""Operator reordering: apply each weight update as soon as its gradient exists.

`append_updates(graph, grads, lr)` adds one `sgd_update(param, grad)` node per trained parameter.
With `reorder=True` (the default) each update goes right after the node that produces its
gradient (or after the last node that still reads the old parameter), so the gradient dies at once and never coexists with the gradients of other layers
(TTE's in-place update); with `reorder=False` all updates run after the whole backward pass, as
a framework's optimizer step does. The memory planner measures the difference.
"""

from __future__ import annotations

from edgewise.tiny.ir import Graph, Node

UPDATED_PREFIX = "updated:"


def append_updates(graph: Graph, grads: dict[str, str], lr: float, reorder: bool = True) -> list[Node]:
    producers = graph.producers()
    updates = []
    for param, grad in grads.items():
        if grad not in producers:
            raise ValueError(f"gradient {grad} of {param} is not produced by any node")
        updates.append(graph.add_node("sgd_update", [param, grad], [(UPDATED_PREFIX + param, graph.values[param].shape)], {"lr": lr}, source=f"update of {param}"))
    if reorder:
        # an update may run once its gradient exists and nothing else will read the old parameter
        # (a conv's input gradient reads its weight: the rule table emits it before the weight gradient)
        rest = [n for n in graph.nodes if n.op != "sgd_update"]
        index = {n.name: i for i, n in enumerate(rest)}
        after: dict[int, list[Node]] = {}
        for u in updates:
            param, grad = u.inputs
            readers = [i for i, n in enumerate(rest) if param in n.inputs]
            after.setdefault(max([index[producers[grad].name], *readers]), []).append(u)
        graph.nodes = [m for i, n in enumerate(rest) for m in [n, *after.get(i, [])]]
    graph.outputs = [o for o in graph.outputs if o not in set(grads.values())] + [u.outputs[0] for u in updates]
    return updates
