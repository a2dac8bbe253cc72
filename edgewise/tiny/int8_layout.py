"""Memory layout of the int8 training graph: what each value costs and which buffers are shared.

Given the compiled training graph (forward, pruned backward, in-place updates), `int8_layout`
returns the `memory.Layout` the int8 executor and the C backend follow:

- **dtypes**: the image and every forward activation are int8; gradients, logits and the loss are
  fp32 (`int8_ops`: gradients of the real tensors); the label is an int32.
- **fused activations**: a ReLU/ReLU6 after a conv is its requantization clamp, so its output is
  the conv's output buffer (an alias, no bytes of its own).
- **in-place depthwise** (TinyEngine): a depthwise conv whose input is read by nothing later
  writes its output over its input, channel by channel through a one-channel scratch buffer.
- **streamed frozen chains** (MCUNetV2's patch-based idea, row by row): a chain of convs in the
  frozen part of the forward pass, each intermediate read only by the next conv (and by no
  backward op), runs row by row. Each intermediate lives in a ring buffer of as many rows as the
  next conv's kernel is tall instead of as a whole tensor; a residual add that closes the chain
  on the chain's input runs row by row too. Results are bit-identical to layer-by-layer execution
  (every int8 output element is the same integer function of the same inputs), so the reference
  executor runs layer by layer and only the memory plan (and the C kernel) differ. The chain's
  input stays alive until the chain's last row is made.

`LAYOUT_STAGES` names the cumulative options, for the ablation in `benchmarks/tiny_memory.py`.
"""

from __future__ import annotations

from edgewise.tiny.autodiff import GRAD_PREFIX
from edgewise.tiny.frontend import LABEL, LOGITS, LOSS
from edgewise.tiny.ir import Graph, Node
from edgewise.tiny.memory import Layout, Scratch, alias_root

LAYOUT_STAGES = ("layer_by_layer", "inplace_depthwise", "streamed")
FORWARD_INT8 = ("conv2d", "relu", "relu6", "add", "mean_hw", "slice_channels")


def _fused_activation(node: Node, readers: dict[str, list[Node]]) -> Node | None:
    users = readers[node.outputs[0]]
    return users[0] if len(users) == 1 and users[0].op in ("relu", "relu6") else None


def int8_layout(graph: Graph, stage: str = "streamed") -> Layout:
    if stage not in LAYOUT_STAGES:
        raise ValueError(f"unknown layout stage '{stage}'; expected one of {', '.join(LAYOUT_STAGES)}")
    readers = graph.consumers()
    loss_step = next(i for i, n in enumerate(graph.nodes) if n.op == "cross_entropy")
    layout = Layout()
    for name, value in graph.values.items():
        if value.kind == "param":
            continue
        if name.startswith(GRAD_PREFIX) or name in (LOGITS, LOSS):
            layout.dtypes[name] = "float32"
        elif name == LABEL:
            layout.dtypes[name] = "int32"
        else:
            layout.dtypes[name] = "int8"
    # a fused activation is its conv's output
    unit_output: dict[str, str] = {}  # conv output -> the value the next layer reads (itself or its activation)
    for node in graph.nodes[:loss_step]:
        if node.op == "conv2d":
            act = _fused_activation(node, readers)
            unit_output[node.outputs[0]] = act.outputs[0] if act else node.outputs[0]
            if act:
                layout.aliases[act.outputs[0]] = node.outputs[0]
    if stage == "layer_by_layer":
        return layout

    step_of = {n.name: i for i, n in enumerate(graph.nodes)}
    # gradients computed where they are read: the broadcast gradient of a global average pool
    # (one value per channel), a clamp's masked gradient (from the gradient and the int8 output),
    # and a parameter gradient read only by its update, whose kernel computes each element and
    # applies it at once (TTE's in-place update): these tensors never exist whole
    for node in graph.nodes:
        if node.op in ("mean_hw_grad", "relu_grad", "relu6_grad"):
            layout.lazy[node.outputs[0]] = list(node.inputs)
        elif node.op in ("conv2d_grad_weight", "linear_grad_weight", "sum_nhw", "sum_n"):
            if [r.op for r in readers[node.outputs[0]]] == ["sgd_update"]:
                layout.lazy[node.outputs[0]] = list(node.inputs)
    last_use: dict[str, int] = {v: max((step_of[r.name] for r in readers[v]), default=-1) for v in graph.values}
    for v in graph.outputs:
        last_use[v] = len(graph.nodes)
    made_at = {o: step_of[n.name] for n in graph.nodes for o in n.outputs}
    for lazy in sorted(layout.lazy, key=lambda v: -made_at[v]):  # sources are read whenever the lazy value is
        for src in layout.lazy[lazy]:
            last_use[src] = max(last_use[src], last_use[lazy])

    def free_after(value: str, step: int) -> bool:
        """Nothing reads `value`'s buffer (any value sharing it) after `step`, and it is a real buffer."""
        base = alias_root(layout.aliases, value)
        if base in layout.lazy or base in graph.inputs or graph.values[base].kind == "param":
            return False
        members = [base] + [a for a in layout.aliases if alias_root(layout.aliases, a) == base]
        return all(last_use[m] <= step for m in members)

    # a depthwise conv writes over its input, channel by channel through a one-channel scratch buffer
    for step, node in enumerate(graph.nodes[:loss_step]):
        x = node.inputs[0]
        if node.op != "conv2d" or not (node.attrs["groups"] == graph.values[x].shape[1] == graph.values[node.outputs[0]].shape[1]):
            continue
        if free_after(x, step):
            layout.aliases[node.outputs[0]] = alias_root(layout.aliases, x)
            n, _, h, w = graph.values[x].shape
            ph, pw = node.attrs["padding"]
            layout.scratch.append(Scratch(f"scratch:{node.name}", step, step, n * (h + 2 * ph) * (w + 2 * pw)))
    # a residual add (forward, or a sum of two gradients) writes over an input nobody reads later
    for step, node in enumerate(graph.nodes):
        out = node.outputs[0]
        if node.op != "add" or out in layout.lazy:
            continue
        for x in node.inputs:
            same = graph.values[x].shape == graph.values[out].shape and layout.dtypes[x] == layout.dtypes[out]
            if same and free_after(x, step):
                layout.aliases[out] = alias_root(layout.aliases, x)
                break
    if stage == "inplace_depthwise":
        return layout

    for chain in _frozen_chains(graph, readers, loss_step, unit_output):
        first, last = step_of[chain[0].name], step_of[chain[-1].name]
        ring = 0

        def stream(conv: Node, rows: int) -> int:
            """The conv's output (and its fused activation) lives as `rows` rows; returns their bytes."""
            conv_out = conv.outputs[0]
            for v in {conv_out, unit_output[conv_out]}:
                layout.streamed.add(v)
                layout.aliases.pop(v, None)
            layout.ring_rows[conv_out] = rows
            n, c, _, w = graph.values[conv_out].shape
            return n * c * w * rows

        for unit, consumer in zip(chain, chain[1:]):
            if consumer.op == "conv2d":  # as many rows as the next kernel is tall
                ring += stream(unit, graph.values[consumer.inputs[1]].shape[2])
        if chain[-1].op == "add":  # the last conv's output is added row by row, never stored whole
            ring += stream(chain[-2], 1)
        layout.scratch = [s for s in layout.scratch if not first <= s.start <= last]  # the chain kernel handles depthwise itself
        layout.scratch.append(Scratch(f"rows:{chain[0].name}", first, last, ring))
        layout.chains.append([n.name for n in chain])
        # the chain reads its input row by row until its last row is made: keep it alive that long
        # (layer by layer, its last reader would be the first conv)
        x0 = chain[0].inputs[0]
        layout.live_until[x0] = max(layout.live_until.get(x0, -1), last)
    return layout


def _frozen_chains(graph: Graph, readers: dict[str, list[Node]], loss_step: int, unit_output: dict[str, str]) -> list[list[Node]]:
    """Maximal runs of forward convs (each with its fused activation) where every intermediate is
    read only by the next conv, optionally closed by a residual add on the run's input."""
    chains: list[list[Node]] = []
    in_chain: set[str] = set()
    for node in graph.nodes[:loss_step]:
        if node.op != "conv2d" or node.name in in_chain:
            continue
        chain = [node]
        while True:
            out = unit_output[chain[-1].outputs[0]]
            users = readers[out]
            conv_users = [u for u in users if u.op == "conv2d"]
            if chain[-1].outputs[0] != out and len(readers[chain[-1].outputs[0]]) != 1:
                break
            if len(users) == 1 and conv_users:
                chain.append(conv_users[0])
                continue
            x0 = chain[0].inputs[0]
            if len(users) == 1 and users[0].op == "add" and x0 in users[0].inputs and len(chain) > 1:
                chain.append(users[0])
            break
        if sum(1 for n in chain if n.op == "conv2d") >= 2:
            chains.append(chain)
            in_chain.update(n.name for n in chain)
    return chains
