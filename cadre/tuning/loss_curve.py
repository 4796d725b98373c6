"""The training loss curve of an adapter refresh as a CSV table and a PNG plot (the run's `training/` artifacts)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def write_loss_curve(curve: list[dict[str, float]], folder: Path, heldout_loss: float | None = None) -> list[Path]:
    """Write `loss_curve.csv` (every logged value per step, `step` first) and `loss_curve.png` into `folder`.

    Args:
        curve: one row per logged optimizer step, each with `step` and `loss` (and whatever else was logged).
        folder: created if missing.
        heldout_loss: the completion loss on the held-out examples after training, drawn on the same chart at the
            last step (a dashed level and a marker) so over-fitting shows as a gap; None when there were none.

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
    steps = [row["step"] for row in curve]
    axis.plot(steps, [row["loss"] for row in curve], linewidth=1.2, label="training loss")
    if heldout_loss is not None and math.isfinite(heldout_loss):
        last = steps[-1] if steps else 0.0
        axis.axhline(heldout_loss, color="tab:orange", linestyle="--", linewidth=1.0, alpha=0.7)
        axis.plot(
            [last], [heldout_loss], "o", color="tab:orange", label=f"held-out loss after training ({heldout_loss:.3f})"
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (completion tokens)")
    axis.set_title("Adapter refresh: training and held-out loss")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return [table, plot]
