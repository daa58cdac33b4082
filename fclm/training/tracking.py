"""What a training run reports: log lines, ``metrics.jsonl``, TensorBoard, wandb, a progress bar.

Only the main process writes. Every logged step carries every named loss, the weighted total, the
learning rate, samples/s and tokens/s (non-padding tokens), so runs can be compared line by line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("fclm.train")


class RunTracker:
    """Collects per-step scalars and writes them (main process only).

    Arguments:
        output_dir: ``metrics.jsonl`` and ``tensorboard/`` are written here.
        total_steps: for the progress bar and the ``step i/N`` log prefix.
        every: write a log line / metrics row every this many steps (and at the first and last step).
        enabled: ``False`` on non-main processes: nothing is written.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        every: int = 10,
        enabled: bool = True,
        progress_bar: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "fclm",
        run_config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.every = max(1, every)
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self._bar = None
        self._tb = None
        self._wandb = None
        self._window_samples = 0
        self._window_tokens = 0
        self._window_start = time.perf_counter()
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                logger.warning("logging.wandb is on but wandb is not installed; logging to TensorBoard and metrics.jsonl only")
            else:
                import wandb as _wandb

                self._wandb = _wandb.init(project=wandb_project, config=run_config, dir=str(self.output_dir))

    def count(self, samples: int, tokens: int) -> None:
        """Add one micro-batch's samples and tokens to the throughput window (call on every step)."""
        self._window_samples += samples
        self._window_tokens += tokens

    def log_step(self, step: int, scalars: dict[str, float], *, world_size: int = 1) -> None:
        """Report optimizer step ``step`` (1-based). Throughput is over the steps since the last report,
        scaled by ``world_size`` (every process sees its own batches)."""
        if self._bar is not None:
            self._bar.update(1)
        if not self.enabled or not (step % self.every == 0 or step == 1 or step == self.total_steps):
            return
        now = time.perf_counter()
        dt = max(now - self._window_start, 1e-9)
        row = {
            "step": step,
            **{k: float(v) for k, v in scalars.items()},
            "samples_per_s": self._window_samples * world_size / dt,
            "tokens_per_s": self._window_tokens * world_size / dt,
        }
        self._window_samples = self._window_tokens = 0
        self._window_start = now
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        losses = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("loss") or k == "total")
        logger.info(
            "step %d/%d %s lr %.3e samples/s %.1f tokens/s %.0f",
            step, self.total_steps, losses, row.get("lr", 0.0), row["samples_per_s"], row["tokens_per_s"],
        )
        if self._bar is not None:
            self._bar.set_postfix(total=f"{row.get('total', float('nan')):.3f}", lr=f"{row.get('lr', 0.0):.1e}")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def log_event(self, step: int, **fields: Any) -> None:
        """A non-periodic record (a skipped step, a checkpoint) in ``metrics.jsonl``."""
        if self.enabled:
            self._metrics.write(json.dumps({"step": step, **fields}) + "\n")
            self._metrics.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics.close()


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """``metrics.jsonl`` → {step: row} of the periodic rows; a step logged twice (a resumed run) keeps the last."""
    rows: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "total" in row:
            rows[int(row["step"])] = row
    return rows


__all__ = ["RunTracker", "read_metrics"]
