"""Float32Matmuls: bf16 products computed in float32 and rounded back, autograd saving bf16 tensors only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fclm.training import bf16_cpu
from fclm.training.bf16_cpu import Float32Matmuls


def test_products_match_float32_rounded_to_bf16_and_keep_dtype(monkeypatch):
    monkeypatch.setattr(bf16_cpu, "CHUNK_ROWS", 8)  # exercise the chunked path on a small weight
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 16), torch.randn(20, 16), torch.randn(20)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    with Float32Matmuls():
        y = F.linear(xb, wb, bb)
        y_kw = F.linear(input=xb, weight=wb, bias=bb)  # peft calls it with keywords
        z = xb @ wb.T
        e = torch.einsum("bld,nd->bln", xb, wb)
        c = F.conv2d(torch.randn(1, 3, 8, 8).bfloat16(), torch.randn(4, 3, 2, 2).bfloat16(), stride=2)
        f32 = F.linear(x, w, b)  # float32 is left alone
    ref = F.linear(xb.float(), wb.float(), bb.float())
    assert y.dtype == z.dtype == e.dtype == c.dtype == torch.bfloat16 and f32.dtype == torch.float32
    assert torch.equal(y, ref.bfloat16()) and torch.equal(y_kw, y)
    assert torch.allclose(z.float(), (xb.float() @ wb.float().T), atol=0.1) and torch.equal(z, e)


def test_linear_gradients_match_float32_and_autograd_saves_no_float32_copy():
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.dtype] = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with Float32Matmuls(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = F.linear(x, w)
    (y.float() ** 2).sum().backward()
    assert saved and all(d == torch.bfloat16 for d in saved)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = F.linear(x32, w32)
    (y32.bfloat16().float() ** 2).sum().backward()
    assert torch.allclose(x.grad.float(), x32.grad, rtol=0.02, atol=0.5)
    assert torch.allclose(w.grad.float(), w32.grad, rtol=0.02, atol=0.5)
