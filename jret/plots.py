"""Figures for retrieval experiments: precision–recall curves and ranked-list image grids."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
LABEL_COLOURS = {"easy": "#1a9850", "hard": "#91cf60", "junk": "#bdbdbd", "negative": "#d73027"}


def precision_recall(
    ranking: np.ndarray, ok: Sequence[int], junk: Sequence[int] = ()
) -> np.ndarray:
    """Interpolated precision at 101 recall levels for one query (junk images removed first).

    Args:
      ranking: database ids by decreasing score ``(n,)``.
      ok: ids of the positives; junk: ids ignored.

    Returns ``(101,)`` precision, the maximum precision at any recall ≥ each level (0 beyond the
    recall reached).
    """
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk)
    if not ok:
        raise ValueError("ok: expected at least one positive")
    hits = np.array([i in ok for i in map(int, ranking) if i not in junk], dtype=float)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / len(ok)
    out = np.zeros_like(RECALL_LEVELS)
    for j, level in enumerate(RECALL_LEVELS):
        reached = recall >= level - 1e-12
        out[j] = precision[reached].max() if reached.any() else 0.0
    return out


def plot_pr_curves(
    curves: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = ""
) -> None:
    """Plot mean precision–recall curves, one per stage; ``curves[stage]`` is ``(n_queries, 101)``."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    for stage, pr in curves.items():
        ax.plot(RECALL_LEVELS, np.mean(pr, axis=0), label=stage)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ranked_grid(
    queries: Sequence[np.ndarray],
    results: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a grid: one row per query (its crop first), then its top results framed by label.

    Args:
      queries: query crops ``(H, W, 3)`` in [0, 1].
      results: per query, the images of its top results in rank order.
      labels: per query and result, one of ``'easy'``, ``'hard'``, ``'junk'``, ``'negative'``.
    """
    n_rows, n_cols = len(queries), 1 + max(len(r) for r in results)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.6 * n_cols, 1.5 * n_rows), dpi=90, squeeze=False
    )
    for r in range(n_rows):
        axes[r, 0].imshow(np.clip(queries[r], 0, 1))
        axes[r, 0].set_title("query", fontsize=7)
        for c in range(1, n_cols):
            ax = axes[r, c]
            if c - 1 < len(results[r]):
                label = labels[r][c - 1]
                ax.imshow(np.clip(results[r][c - 1], 0, 1))
                ax.set_title(f"{c}: {label}", fontsize=7, color=LABEL_COLOURS.get(label, "black"))
                for spine in ax.spines.values():
                    spine.set_edgecolor(LABEL_COLOURS.get(label, "black"))
                    spine.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training_curves(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = ""
) -> None:
    """Training loss and validation mAP (Easy/Medium/Hard, %) per epoch, side by side.

    ``history`` holds one record per epoch with ``epoch`` and optionally ``loss`` and
    ``val_easy`` / ``val_medium`` / ``val_hard`` (fractions); epoch 0 is the untrained network.
    """
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    rows = [r for r in history if r.get("loss") is not None]
    ax_loss.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean loss per step", title="training loss")
    for setup in ("easy", "medium", "hard"):
        rows = [r for r in history if f"val_{setup}" in r]
        ax_map.plot(
            [r["epoch"] for r in rows],
            [100 * r[f"val_{setup}"] for r in rows],
            marker="o",
            label=setup.capitalize(),
        )
    ax_map.set(xlabel="epoch", ylabel="mAP (%)", title="validation (revisited protocol)")
    ax_map.legend(fontsize=8)
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
