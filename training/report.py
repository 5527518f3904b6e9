"""What a run leaves next to its checkpoint: the JSONL epoch log and the confusion-matrix PNG."""
from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"
CONFUSION_FILE = "confusion.png"


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, true classes down, predictions across."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, nor on training servers
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(5.0, 0.6 * n + 2) if n <= 30 else 12.0
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond that (ImageNet) labels and counts are unreadable
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
