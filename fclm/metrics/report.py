"""Writing a scoring run: ``per_sample.jsonl``, ``summary.json``, ``summary.md`` and an optional histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fclm.io import atomic_write, write_json, write_jsonl

METRIC_ORDER = (
    "giou", "ciou", "n_acc", "t_acc", "pr_07", "pr_08", "pr_09", "f1score", "f1score_giou", "acc_05",
    "mrr", "riou", "oiou", "miou", "acc", "ap50", "recall", "meteor", "cider", "ss", "siou", "pos", "neg", "avg",
)  # fmt: skip
NOT_A_FRACTION = {"cider"}


def summary_markdown(title: str, metrics: dict[str, float], counts: dict[str, int], notes: Sequence[str], convention: str = "") -> str:
    """A Markdown page: the metric table (fraction and ×100), the counts, the notes."""
    lines = [f"# {title}", ""]
    if convention:
        lines += [convention, ""]
    lines += ["| metric | value | ×100 |", "|---|---:|---:|"]
    for k in sorted(metrics, key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else len(METRIC_ORDER), k)):
        v = metrics[k]
        hundred = "—" if k in NOT_A_FRACTION else f"{100 * v:.2f}"
        lines.append(f"| {k} | {v:.4f} | {hundred} |")
    if counts:
        lines += ["", "| count | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in counts.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_histogram(path: Path, values: Sequence[float], label: str, title: str) -> None:
    """A PNG histogram of ``values`` (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.hist(list(values), bins=20, range=(0.0, 1.0) if all(0.0 <= v <= 1.0 for v in values) else None, color="#4477aa", edgecolor="white")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        ax.set_title(f"{title} (n = {len(values)})")
        fig.tight_layout()
        with atomic_write(path, mode="wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def write_run(out_dir: str | Path, summary: dict[str, Any], per_sample: Sequence[dict], markdown: str) -> dict[str, Path]:
    """Write the three text outputs atomically; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_sample": out / "per_sample.jsonl", "summary": out / "summary.json", "markdown": out / "summary.md"}
    write_jsonl(paths["per_sample"], per_sample)
    write_json(paths["summary"], summary)
    with atomic_write(paths["markdown"]) as f:
        f.write(markdown)
    return paths
