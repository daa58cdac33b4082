"""bf16 matrix products computed in float32 on CPUs without bf16 instructions (measurement tool).

On an AVX2 CPU (no AVX-512 BF16 / AMX) torch's bf16 kernels are emulated: here ``F.linear`` ran at
~3 GFLOPS and ``matmul``/``bmm`` at ~0.1 GFLOPS in bf16 against 10–28 GFLOPS in float32
(``docs/scale.md``), so one step of the real 3B model would take hours. Inside
:class:`Float32Matmuls`, matrix products (``linear``, ``matmul``/``@``, ``bmm``, ``einsum``, ``conv``)
whose inputs are all bf16 (or all fp16) upcast them to float32, multiply, and round the result back
to the input dtype: what a GPU's tensor cores do (16-bit inputs, float32 accumulation, 16-bit output).
Weights stay in bf16, every other op runs in bf16, and ``linear`` saves its bf16 input and weight
for backward (not float32 copies), so memory behaves as on a GPU apart from one transient float32
copy per product (weights of more than :data:`CHUNK_ROWS` rows are multiplied in row chunks).

Use it only to run or measure bf16 models on such CPUs; it changes no module and leaves float32 alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Float32Matmuls", "CHUNK_ROWS"]

CHUNK_ROWS = 16384
"""Weights with more output rows than this (``lm_head``: 151,936) are upcast and multiplied in chunks."""

_LOW = (torch.bfloat16, torch.float16)


def _linear32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``x @ weight.T + bias`` with ``weight`` upcast in row chunks; x already float32."""
    if weight.shape[0] <= CHUNK_ROWS:
        return F.linear(x, weight.float(), None if bias is None else bias.float())
    parts = []
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        b = None if bias is None else bias[start : start + CHUNK_ROWS].float()
        parts.append(F.linear(x, weight[start : start + CHUNK_ROWS].float(), b))
    return torch.cat(parts, dim=-1)


class _Linear32(torch.autograd.Function):
    """``F.linear`` of 16-bit tensors in float32; saves the 16-bit input and weight for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear32(x.float(), weight, bias).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, weight = ctx.saved_tensors
        g = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            parts = [
                g[..., s : s + CHUNK_ROWS] @ weight[s : s + CHUNK_ROWS].float()
                for s in range(0, weight.shape[0], CHUNK_ROWS)
            ]
            grad_x = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).T @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


_PRODUCTS = {
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum,
    torch.baddbmm, torch.addmm, F.conv2d, F.conv3d,
}


def _tensors(args: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _up(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.dtype in _LOW:
        return a.float()
    if isinstance(a, (list, tuple)):
        return type(a)(_up(t) for t in a)
    return a


class Float32Matmuls(TorchFunctionMode):
    """Context manager: 16-bit matrix products run in float32 and come back in their 16-bit dtype (see module)."""

    @staticmethod
    def intercepts(func: Any, args: tuple, kwargs: dict) -> torch.dtype | None:
        """The 16-bit dtype when ``func(*args, **kwargs)`` is a product this mode computes in float32, else None."""
        if func is F.linear or func in _PRODUCTS:
            tensors = _tensors(list(args) + list(kwargs.values()))
            dtypes = {t.dtype for t in tensors}
            if len(dtypes) == 1 and next(iter(dtypes)) in _LOW and all(t.device.type == "cpu" for t in tensors):
                return next(iter(dtypes))
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dtype = self.intercepts(func, args, kwargs)
        if dtype is not None:
            if func is F.linear:
                named = dict(zip(("input", "weight", "bias"), args), **kwargs)
                x, weight, bias = named["input"], named["weight"], named.get("bias")
                if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias) if t is not None):
                    return _Linear32.apply(x, weight, bias)
                with torch.no_grad():
                    return _linear32(x.float(), weight, bias).to(dtype)
            out = func(*_up(args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(dtype) if isinstance(out, torch.Tensor) else out
        return func(*args, **kwargs)
