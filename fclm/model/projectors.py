"""MLP projectors between the LLM hidden space and the SAM prompt space.

FCLM uses three: ``seg_projector`` (h[SEG] → z_seg), ``pos_projector`` (<pos> token → z_pos) and,
for the self-reconstruction ablation, ``mask_projector`` (<mask> token → prompt space).

``seg_projector`` may standardise its input first (:class:`FeatureStandardize`, config
``seg_query_norm: standardize``; every preset uses the plain projector, ``none``). In a randomly
initialised LLM the ``[SEG]`` state is almost the same vector in every sample (its own embedding
dominates the residual stream) and the part that depends on the expression is ~1% of its variance. With
the old demo recipe (LoRA r16 with dropout, new-token rows only, AdamW betas (0.9, 0.999), cosine lr) the
mask decoder then learned to ignore the query unless h[SEG] was standardised; with every input-embedding
row trainable, LoRA r8 without dropout and AdamW betas (0.9, 0.95), clipping at 1.0 and a constant lr the
plain projector routed too in RES-only runs (docs/benchmarks.md, "Consistency learning").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["FeatureStandardize", "MLPProjector"]


class FeatureStandardize(nn.Module):
    """Per-feature ``(x − mean) / sqrt(var + eps)`` with statistics learned from the training batches.

    In training (with ``update_stats`` on and autograd enabled) each batch's mean/var first update
    running averages (exponential moving average; the first batch sets them), then the batch is
    normalised with the updated running values — the same map inference uses, and a batch of one
    works. (Normalising a training batch with its own statistics, as BatchNorm does, lost in the demo:
    with task-grouped batches each task trains on statistics that inference never sees; see
    docs/benchmarks.md, "Demo".) ``update_stats = False`` (the trainability policy sets it when the
    projector is frozen) keeps the statistics fixed.

    The statistics are detached (no gradient flows through them) and, under ``torch.distributed``,
    summed over processes — every process must call ``forward`` each step, with zero rows if it has none
    — so all ranks normalise alike. They are buffers: checkpoints and ``save_pretrained`` carry them.

    Arguments:
      dim: feature width.
      momentum: weight of a new batch in the moving average.
      eps: added to the variance.
    """

    def __init__(self, dim: int, *, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"FeatureStandardize momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.update_stats = True
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        # float64 sums: the variance of h[SEG] can be ~1e-4 of its mean square (E[x²] − E[x]² cancels)
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        stats = torch.cat([flat.sum(0), (flat * flat).sum(0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        dim = x.shape[-1]
        n = int(stats[-1])
        if n < 2:  # one row (or none) anywhere: no variance to estimate
            return
        mean = (stats[:dim] / n).to(self.running_mean.dtype)
        var = (stats[dim : 2 * dim] / n - (stats[:dim] / n) ** 2).clamp(min=0.0).to(self.running_var.dtype)
        if int(self.num_batches) == 0:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.num_batches += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, dim) → (…, dim), standardised per feature."""
        if self.training and self.update_stats and torch.is_grad_enabled():
            self._update(x)
        scale = torch.rsqrt(self.running_var.float() + self.eps)
        return ((x.float() - self.running_mean.float()) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.running_mean.shape[0]}, momentum={self.momentum}, eps={self.eps}"


class MLPProjector(nn.Module):
    """LISA-style ``text_hidden_fcs``: ``Linear → ReLU → … → Linear``, no final activation.

    Arguments:
      in_dim: input width (e.g. LLM hidden size).
      out_dim: output width (e.g. SAM prompt dim).
      num_layers: number of Linear layers (≥ 1); 2 gives LISA's ``Linear(in, in) → ReLU → Linear(in, out)``.
      hidden_dim: width of the hidden layers; defaults to ``in_dim`` as in LISA.
      input_norm: standardise the input with :class:`FeatureStandardize` first.
    """

    def __init__(
        self, *, in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int | None = None, input_norm: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPProjector needs num_layers >= 1, got {num_layers}")
        hidden = in_dim if hidden_dim is None else hidden_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.norm = FeatureStandardize(in_dim) if input_norm else None
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in_dim) → (…, out_dim)."""
        if self.norm is not None:
            x = self.norm(x)
        return self.layers(x)
