"""The step measurement's allocator peak (``fclm.training.scale.allocator_trace``) against allocation
patterns whose peak is known another way: plain tensors, a small MLP's saved activations and gradients,
and a bf16 product run in float32 (its float32 copies reported as CPU-only)."""

from __future__ import annotations

import torch
import torch.nn as nn

from fclm.training.scale import (
    LabelledFloat32Matmuls, _count_saved, allocator_trace, measure_step, tensor_bytes,
)

MiB = 2**20


def test_peak_of_a_known_allocation_pattern():
    """64 MiB, freed; 32 + 32 MiB, one freed; 48 MiB → peak 80 MiB (32 + 48 live), 16 left at the end."""
    with allocator_trace() as t:
        a = torch.empty(64 * MiB, dtype=torch.uint8)
        del a
        b = torch.empty(32 * MiB, dtype=torch.uint8)
        c = torch.empty(32 * MiB, dtype=torch.uint8)
        del b
        d = torch.empty(48 * MiB, dtype=torch.uint8)
        del c
        e = torch.ones(16 * MiB, dtype=torch.uint8)
        del d
    assert t.peak_bytes == t.reporter_peak_bytes == 80 * MiB
    assert t.end_bytes == 16 * MiB and t.allocations == 5 and t.allocated_bytes == 192 * MiB
    (live,) = t.live_at_peak  # one site: c and d, both from aten::empty
    assert live["bytes"] == 80 * MiB and live["count"] == 2 and live["largest"] == 48 * MiB
    assert "aten::empty" in live["site"] and not live["cpu_only"]
    assert t.cpu_only_at_peak_bytes == 0 and t.peak_without_cpu_only_bytes == t.peak_bytes
    del e


def test_small_mlp_step_peak_is_its_saved_activation_and_gradients():
    """Linear → ReLU → Linear, float32, input without grad. In backward, when ReLU's gradient is computed,
    live are: the ReLU output autograd saved, the gradient flowing in and the one going out (each B×H), and
    the second layer's weight gradient (H×O); the forward never holds more (h and relu(h): 2·B×H)."""
    torch.manual_seed(0)
    B, D, H, O = 512, 256, 1024, 128
    model = nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, O, bias=False))
    x = torch.randn(B, D)
    saved = {"bytes": 0}
    with allocator_trace(model) as t:
        with _count_saved(saved):
            loss = model(x).sum()
        loss.backward()
    relu_out = B * H * 4
    # what autograd saved that the step allocated: the ReLU output (x and the weights existed before)
    assert saved["bytes"] - x.nbytes - model[2].weight.nbytes == relu_out
    expected = relu_out + 2 * relu_out + model[2].weight.grad.nbytes
    assert abs(t.peak_bytes - expected) <= 64, (t.peak_bytes, expected)  # + the 4-byte loss and its seed
    assert "ReluBackward0" in t.peak_site
    grads = sum(p.grad.nbytes for p in model.parameters())
    assert abs(t.end_bytes - grads) <= 64  # what the step leaves allocated: the gradients
    # the live allocations are named by module (forward) or autograd node (backward)
    sites = {g["site"].split(" | ")[0] + " | " + g["site"].split(" | ")[1]: g["bytes"] for g in t.live_at_peak}
    assert sites["1 | forward"] == relu_out and sites["- | ReluBackward0"] == relu_out


def test_float32_copies_of_bf16_products_are_cpu_only():
    """A bf16 linear under LabelledFloat32Matmuls: a GPU holds the bf16 output and the bf16 weight gradient;
    the float32 copies (input, weight, product, incoming gradient, weight gradient before rounding) are CPU-only."""
    torch.manual_seed(0)
    B, D, H = 256, 512, 1024
    layer = nn.Linear(D, H, bias=False).to(torch.bfloat16)
    x = torch.randn(B, D, dtype=torch.bfloat16)
    with allocator_trace(layer) as t:
        with LabelledFloat32Matmuls():
            y = layer(x)
            y.sum().backward()
    gpu = 2 * B * H + 2 * H * D  # bf16 output (still referenced) + bf16 weight gradient
    assert abs(t.peak_without_cpu_only_bytes - gpu) <= 64, (t.peak_without_cpu_only_bytes, gpu)
    # at the peak (the weight gradient rounded to bf16): y, the float32 incoming gradient, the float32 weight
    # gradient and its bf16 copy (x's float32 copy was freed with the product)
    assert t.cpu_only_at_peak_bytes == 4 * B * H + 4 * H * D, t.live_at_peak
    assert abs(t.peak_bytes - (t.cpu_only_at_peak_bytes + gpu)) <= 64
    assert "_Linear32Backward" in t.peak_site
    assert y.dtype == layer.weight.grad.dtype == torch.bfloat16
    # float32 products run unchanged under the mode (as on a GPU): nothing of theirs is CPU-only
    layer32 = nn.Linear(D, H, bias=False)
    with allocator_trace(layer32) as t32:
        with LabelledFloat32Matmuls():
            layer32(x.float()).sum().backward()
    assert t32.cpu_only_at_peak_bytes == 0 and t32.peak_without_cpu_only_bytes == t32.peak_bytes > 0


def test_measure_step_reports_both_peaks():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(64, 4096, bias=False)

        def forward(self, batch: dict) -> dict:
            return {"out": self.layer(batch["x"])}

    class Criterion:
        def __call__(self, outputs: dict, batch: dict) -> dict:
            return {"loss": outputs["out"].square().mean()}

        def weighted_total(self, losses: dict) -> torch.Tensor:
            return sum(losses.values())

    model = Model()
    batch = {"x": torch.randn(128, 64), "attention_mask": torch.ones(1, 7)}
    assert tensor_bytes(model, batch) == model.layer.weight.nbytes + batch["x"].nbytes + batch["attention_mask"].nbytes
    m = measure_step(model, batch, Criterion(), track_allocations=True)
    out = 128 * 4096 * 4
    assert m.tokens == 7 and m.peak_rss_bytes > 0
    # out (saved by the square) and the gradients and temporaries of mean and square's backward, all of out's
    # size (5 × out with torch 2.14); the step leaves the weight gradient (+ the 4-byte loss and its seed)
    assert out * 2 <= m.allocator.peak_bytes <= out * 6, m.allocator.live_at_peak
    assert any(g["site"].startswith("layer | forward | aten::linear") and g["bytes"] == out
               for g in m.allocator.live_at_peak)
    assert abs(m.allocator.end_bytes - model.layer.weight.nbytes) <= 64
    assert tensor_bytes(model) == 2 * model.layer.weight.nbytes  # the gradient is allocated now
    assert measure_step(model, batch, Criterion()).allocator is None
