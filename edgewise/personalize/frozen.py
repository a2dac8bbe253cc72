"""Backward through a frozen, quantized base: the gradient with respect to a layer's *input*, never its weight.

Personalization trains small parameters (norm gains, biases, low-rank adapters, row slices) on top of the GGUF's own
quantized matrices, which stay as they are. Gradients must still flow through every frozen matrix between the loss
and the lowest trained parameter: for y = x W^T, dL/dx = dL/dy W. The forward runs the native quantized kernel;
the backward dequantizes W a slice of rows at a time (`ROW_CHUNK_BYTES` of fp32 at most) and sums
dL/dy[:, rows] W[rows], so no fp32 copy of a matrix ever exists whole, and nothing is saved for the backward at
all (x is not needed: W is frozen).

The output head is the largest matrix of a small model (49k-152k vocabulary rows), and its logits the largest
activation. `chunked_nll` never holds them whole: the forward computes them a few tokens at a time and keeps only
each token's log-sum-exp; the backward recomputes them a slice of the vocabulary at a time from dequantized rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.lm.weights import ConcatLinear, DenseLinear, Int8Linear, KQuantLinear, Q4Linear, Q8Linear

ROW_CHUNK_BYTES = 1 << 20  # fp32 rows of a frozen matrix dequantized at once in a backward
LOGIT_CHUNK_BYTES = 1 << 20  # fp32 logits held at once by the chunked cross-entropy
DENSE_ROWS = 128  # from this many rows of input, frozen layers multiply dequantized slices (`dense_forward`)


class Scratch:
    """Reused fp32 buffers for the chunks of the frozen layers' products. A chunk of rows dequantized afresh each
    time is a fresh allocation of up to `ROW_CHUNK_BYTES`; `tune` has glibc hand every block of 64 KiB and more back to
    the OS at once (`metrics.memory.release_freed_memory`, so freed activations leave the RSS), which makes each such
    allocation an mmap whose pages fault in anew. Measured on SmolLM2, a 64 MB plan: 2.95 s a step before these
    buffers, 2.2 s with them, the same peak memory. (With glibc's defaults, which keep freed blocks resident, a step
    takes 1.1 s but the training peak is 335 MB above the inference footprint instead of 57: the activations'
    remaining allocations are what the rest of the time goes to.)"""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n)
        return buf[:n].view(*shape)


SCRATCH = Scratch()  # the step runs on one Python thread


def dequantized_rows(module: nn.Module, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start..stop-1 of a frozen linear layer's weight, dequantized exactly to fp32 [stop - start, in], into `out`
    when given (contiguous fp32 of that shape)."""
    n = stop - start
    if isinstance(module, Q4Linear):  # 16 bytes of nibbles per block of 32: low nibbles are elements 0-15, high 16-31
        w = out if out is not None else torch.empty(n, module.in_features)
        qs = module.qs[start:stop].reshape(n, -1, 16)
        blocks = w.view(n, -1, 32)
        lo, hi = blocks[..., :16], blocks[..., 16:]
        lo.copy_(qs)  # the byte, then split in fp32 in place (exact: integers below 256)
        hi.copy_(lo).div_(16, rounding_mode="floor")
        lo.fmod_(16)
        blocks.mul_(module.d[start:stop, :, None].float()).add_(module.m[start:stop, :, None].float())
        return w
    if isinstance(module, Q8Linear):
        w = out if out is not None else torch.empty(n, module.in_features)
        w.view(n, -1, 32).copy_(module.qs[start:stop].view(n, -1, 32)).mul_(module.d[start:stop, :, None].float())
        return w
    if isinstance(module, KQuantLinear) and out is not None:
        return module.rows_into(start, out)
    if isinstance(module, (KQuantLinear, Int8Linear, DenseLinear)):
        w = module.rows(torch.arange(start, stop))
        return out.copy_(w) if out is not None else w
    if isinstance(module, ConcatLinear):
        w = out if out is not None else torch.empty(n, module.in_features)
        at = 0
        for part in module.parts:
            lo, hi = max(start, at), min(stop, at + part.out_features)
            if lo < hi:
                dequantized_rows(part, lo - at, hi - at, w[lo - start : hi - start])
            at += part.out_features
        return w
    raise EdgewiseError(
        f"cannot backpropagate through a {type(module).__name__} layer: tuning needs edgewise's native kernels (an AVX2 CPU)"
        " or --precision fp32"
    )


def input_grad(module: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """dL/dx = dL/dy W for y = x W^T, W dequantized `ROW_CHUNK_BYTES` at a time."""
    n_out, n_in = module.out_features, module.in_features
    g = grad_out.float().reshape(-1, n_out)
    grad_in = torch.zeros(g.shape[0], n_in)
    step = max(1, ROW_CHUNK_BYTES // (4 * n_in))
    for start in range(0, n_out, step):
        stop = min(n_out, start + step)
        grad_in.addmm_(g[:, start:stop], dequantized_rows(module, start, stop, SCRATCH.get("rows", stop - start, n_in)))
    return grad_in.reshape(*grad_out.shape[:-1], n_in)


def dense_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T with W dequantized `ROW_CHUNK_BYTES` at a time into fp32 matrix products: on a training window's
    hundreds of rows, several times faster than the quantized kernels, which are made for decoding's one row (and
    exact: no rounding of x)."""
    n_out, n_in = module.out_features, module.in_features
    xf = x.float().reshape(-1, n_in)
    y = torch.empty(xf.shape[0], n_out)
    step = max(1, ROW_CHUNK_BYTES // (4 * n_in))
    for start in range(0, n_out, step):
        stop = min(n_out, start + step)
        w = dequantized_rows(module, start, stop, SCRATCH.get("rows", stop - start, n_in))
        y[:, start:stop].copy_(torch.mm(xf, w.T, out=SCRATCH.get("product", xf.shape[0], stop - start)))
    return y.reshape(*x.shape[:-1], n_out)


def frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer on x: `dense_forward` for a window of `DENSE_ROWS` rows or more, else its own kernel."""
    return dense_forward(module, x) if x.numel() // x.shape[-1] >= DENSE_ROWS else module(x)


class _FrozenLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, observer) -> torch.Tensor:
        ctx.module, ctx.dtype, ctx.observer = module, x.dtype, observer
        if observer is not None:  # the contribution analysis: it needs x for the weight's gradient
            ctx.save_for_backward(x)
        return frozen_forward(module, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.observer is not None:
            ctx.observer(ctx.saved_tensors[0], grad_out)
        return input_grad(ctx.module, grad_out).to(ctx.dtype), None, None


class Frozen(nn.Module):
    """A frozen linear layer of the base that passes gradients to its input (see the module). `observer(x, grad_out)`,
    when set, sees each backward's input and output gradient (the weight's gradient is grad_out^T x): the
    contribution analysis reads it there, where it exists one matrix at a time."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinearFn.apply(x, self.base, self.observer)
        return frozen_forward(self.base, x)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.rows(ids)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
        vocab = head.out_features
        rows = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
        lse = torch.empty(h.shape[0])
        total = torch.zeros(())
        for s in range(0, h.shape[0], rows):
            logits = head(h[s : s + rows]).float()
            lse[s : s + rows] = torch.logsumexp(logits, dim=-1)
            total += (lse[s : s + rows] - logits.gather(1, targets[s : s + rows, None])[:, 0]).sum()
        ctx.save_for_backward(h, targets, lse)
        ctx.head = head
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, targets, lse = ctx.saved_tensors
        head = ctx.head
        vocab, hf = head.out_features, h.float()
        cols = max(1, min(LOGIT_CHUNK_BYTES // (4 * h.shape[0]), ROW_CHUNK_BYTES // (4 * h.shape[1])))
        grad_h = torch.zeros_like(hf)
        for s in range(0, vocab, cols):
            e = min(vocab, s + cols)
            w = dequantized_rows(head, s, e, SCRATCH.get("rows", e - s, hf.shape[1]))  # [cols, D]
            p = torch.mm(hf, w.T, out=SCRATCH.get("product", hf.shape[0], e - s))
            p.sub_(lse[:, None]).exp_()  # softmax over this slice of the vocabulary
            hit = (targets >= s) & (targets < e)
            p[hit.nonzero()[:, 0], targets[hit] - s] -= 1.0
            grad_h.addmm_(p, w)
        return (grad_h * grad).to(h.dtype), None, None


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, anchor: torch.Tensor, fn) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(h)
        with torch.no_grad():
            return fn(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(ctx.needs_input_grad[0])
        with torch.enable_grad():
            # the trained parameters inside `fn` gather their gradients here. A scalar's backward: given `grad` as
            # its grad_tensors, torch.autograd.backward imports sympy (25 MB resident) to check shapes
            (ctx.fn(h) * grad).sum().backward()
        return h.grad, None, None


def recomputed(fn, h: torch.Tensor) -> torch.Tensor:
    """fn(h), keeping only h for the backward, which runs fn again with gradients (activation checkpointing). Its
    own few lines because torch.utils.checkpoint imports torch._dynamo on first use: 80 MB of resident memory."""
    anchor = torch.ones((), requires_grad=True)  # makes the output part of the graph when h takes no gradient
    return _Recompute.apply(h, anchor, fn)


def freeze(model: nn.Module) -> list[Frozen]:
    """Wrap every block matrix of the runtime's decoder in `Frozen`, in place; returns them (the output layer is
    `chunked_nll`'s)."""
    frozen = []
    for block in model.blocks:
        for owner, attr in ((block.attn, "wqkv"), (block.attn, "wo"), (block.ffn, "gate_up"), (block.ffn, "down")):
            module = Frozen(getattr(owner, attr))
            setattr(owner, attr, module)
            frozen.append(module)
    for p in model.parameters():
        p.requires_grad_(False)
    return frozen


def chunked_nll(h: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Summed next-token negative log-likelihood of `targets` [T] given final hidden states `h` [T, D] (after the
    final norm) and the output layer `head`, with its [T, vocab] logits never held whole (see the module)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _ChunkedNLL.apply(h, targets, head)
    with torch.no_grad():
        return _nll_no_grad(h, targets, head)


def _nll_no_grad(h: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * head.out_features))
    total = torch.zeros(())
    for s in range(0, h.shape[0], rows):
        total += F.cross_entropy(head(h[s : s + rows]).float(), targets[s : s + rows], reduction="sum")
    return total
