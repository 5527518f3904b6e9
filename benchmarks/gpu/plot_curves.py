"""Test top-1 per epoch of the H200 sessions' trainings, drawn next to each session's JSON:
results/20261127-h200/gpu-session2.json -> gpu-session2-curves.png,
results/20261128-h200/gpu-session3.json -> gpu-session3-curves.png.

    .venv/bin/python benchmarks/gpu/plot_curves.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main() -> None:
    d27 = json.loads((RESULTS / "20261127-h200" / "gpu-session2.json").read_text())
    runs = [(f"{name} (4 at once)", t) for name, t in d27["call_1_four_trainings_and_serving"]["train"].items()]
    runs += [(f"{name} (alone)", t) for name, t in d27["call_2_b0_alone"]["train"].items()]
    plot(runs, "2026-11-27", "epoch (each run's schedule cut to its --time-budget)", (86, 95), RESULTS / "20261127-h200" / "gpu-session2-curves.png")
    d28 = json.loads((RESULTS / "20261128-h200" / "gpu-session3.json").read_text())
    runs = [(f"{name} (2 at once)", t) for name, t in d28["call_1_two_trainings_and_serving"]["train"].items()]
    plot(runs, "2026-11-28", "epoch (40, the recipe's, fitted in the time budget)", (86, 96), RESULTS / "20261128-h200" / "gpu-session3-curves.png")


def plot(runs: list, date: str, xlabel: str, ylim: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, t in runs:
        rows = [r for r in t["log"] if "val_top1" in r]
        best = [max(r["val_top1"], r["ema_top1"]) * 100 for r in rows]
        ax.plot([r["epoch"] for r in rows], best, marker="o", label=f"{label}: {best[-1]:.2f}%")
    ax.axhline(94, color="grey", linestyle="--", linewidth=1)
    ax.text(4.6, 94.1, "issue target 94%", color="grey", fontsize=8)
    ax.set(xlabel=xlabel, ylabel="test top-1, better of model/EMA (%)",
           title=f"Full recipe on Fashion-MNIST, H200, {date}", ylim=ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
