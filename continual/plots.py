"""Plots of a run: the accuracy matrix as a heat map and AP over tasks (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_accuracy(acc: list[list[float]], tasks: list[str], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.9 * len(acc) + 1.5))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(acc)), [f"after {t}" for t in tasks[: len(acc)]])
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title(f"{method}: accuracy on task (column) after training task (row)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ap_curve(acc: list[list[float]]) -> list[float]:
    """AP after task i: mean accuracy over the tasks seen so far (0..i)."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(acc)]


def plot_ap(acc: list[list[float]], tasks: list[str], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(acc) + 1), ap_curve(acc), marker="o")
    ax.set_xticks(range(1, len(acc) + 1), tasks[: len(acc)], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP over tasks seen")
    ax.set_title(f"{method}: average performance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
