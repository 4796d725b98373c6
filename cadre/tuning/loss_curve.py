"""The training loss curve of an adapter refresh as a CSV table and a PNG plot (the run's `training/` artifacts)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_loss_curve(curve: list[dict[str, float]], folder: Path) -> list[Path]:
    """Write `loss_curve.csv` (every logged value per step, `step` first) and `loss_curve.png` into `folder`.

    Args:
        curve: one row per logged optimizer step, each with `step` and `loss` (and whatever else was logged).
        folder: created if missing.

    Returns:
        The two files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted({key for row in curve for key in row}, key=lambda k: (k != "step", k))
    table, plot = folder / "loss_curve.csv", folder / "loss_curve.png"
    with table.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(curve)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([row["step"] for row in curve], [row["loss"] for row in curve], linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (completion tokens)")
    axis.set_title("Adapter refresh: training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return [table, plot]
