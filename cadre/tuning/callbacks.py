"""The transformers `Trainer` callbacks of Cadre's trainings: fine-tuning (`cadre.tuning.finetune`) and DPO
(`cadre.tuning.dpo`).

They live apart from the training code because subclassing `TrainerCallback` imports transformers'
trainer, and with it torch, peft and bitsandbytes (~10 s). The training functions import this module when
they start; importing a flow, `cadre.cli` or the planning code of `finetune` and `dpo` stays cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from cadre.tuning.finetune import SilentGradientLossError

if TYPE_CHECKING:
    from cadre.tuning.finetune import MetricsSink


class QuietProgress(ProgressCallback):
    """trl's progress bar without a printed dict per logged step (StepMetrics reports instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


class FourBitGuard(TrainerCallback):
    """Refuses to train a 4-bit model whose weights were repacked, or without gradients reaching LoRA."""

    def __init__(self) -> None:
        self.checked_gradients = False
        self.four_bit: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.four_bit = [
            m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state")
        ]
        self._check_layout("before the first step")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.checked_gradients:
            return
        self.checked_gradients = True
        dead = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and "lora_B" in name and (p.grad is None or not bool(p.grad.abs().sum() > 0))
        ]
        broken = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None and not bool(p.grad.isfinite().all())
        ]
        if dead or broken:
            raise SilentGradientLossError(
                f"after step {state.global_step + 1}: {len(dead)} LoRA B matrices got no gradient and {len(broken)} "
                f"parameters a non-finite one (first: {(dead or broken)[0]}); training would silently learn nothing. "
                "On a 4-bit model this is the bitsandbytes repack trap: something ran a no-grad forward on it."
            )

    def on_step_end(self, args, state, control, **kwargs):
        self._check_layout(f"after step {state.global_step}")

    def _check_layout(self, when: str) -> None:
        repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in self.four_bit)
        if repacked:
            raise SilentGradientLossError(
                f"{when}: {repacked} 4-bit layers are in bitsandbytes' CPU inference layout (a no-grad forward "
                "repacked them); gradients would be silently lost. Never evaluate or generate on the model being trained."
            )


class WallCap(TrainerCallback):
    """Stops training at the first step that ends `max_seconds` or more after training began in this process.

    With `checkpoint`, that step is saved as a checkpoint, so a later run resumes from it.
    """

    def __init__(self, max_seconds: float, checkpoint: bool = True):
        self.max_seconds, self.checkpoint = max_seconds, checkpoint
        self.start = 0.0
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and time.perf_counter() - self.start >= self.max_seconds:
            control.should_training_stop = True
            if self.checkpoint:
                control.should_save = True
            self.stopped_at = state.global_step


ETA_EVERY_S = 5.0
"""How often a refresh's `train/estimated_seconds_left` is updated in MLflow while it trains."""
ETA_WINDOW = 10
"""Recent steps the live estimate averages (the first step, which pays one-off costs, never counts)."""


class StepMetrics(TrainerCallback):
    """Per-step metrics to the sink, a time estimate after the first steps, and sparse progress lines."""

    def __init__(self, sink: MetricsSink | None, say: Callable[[str], None], estimate_after: int = 2):
        self.sink, self.say, self.estimate_after = sink, say, estimate_after
        self.timer = 0.0
        self.tokens = 0
        self.step_seconds: list[float] = []
        self.rows: list[dict[str, float]] = []
        self.start = 0.0
        self.estimated = False
        self.eta_logged = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.timer = time.perf_counter()
        self.tokens = state.num_input_tokens_seen or 0
        left = state.max_steps - state.global_step
        where = f"resuming at step {state.global_step}" if state.global_step else "starting"
        self.say(f"training: {where}, {left} of {state.max_steps} steps to go")

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.timer)
        self.timer = now
        # The first step pays one-off costs (allocations, kernel selection): estimate from the next ones.
        if not self.estimated and len(self.step_seconds) > self.estimate_after:
            self.estimated = True
            per_step = sum(self.step_seconds[1:]) / len(self.step_seconds[1:])
            left = state.max_steps - state.global_step
            finish = time.strftime("%H:%M", time.localtime(time.time() + per_step * left))
            self.say(
                f"time estimate: {per_step:.2f} s/step measured × {left} steps left ≈ {_duration(per_step * left)} "
                f"(done ≈ {finish})"
            )
        if self.sink and self.estimated:
            # Live: re-estimated from the recent steps, at most every ETA_EVERY_S seconds (and at the last step).
            left = state.max_steps - state.global_step
            if left == 0 or now - self.eta_logged >= ETA_EVERY_S or self.eta_logged == 0.0:
                recent = self.step_seconds[1:][-ETA_WINDOW:]
                per_step = sum(recent) / len(recent)
                self.sink({"seconds_per_step": per_step, "estimated_seconds_left": per_step * left}, state.global_step)
                self.eta_logged = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        tokens = state.num_input_tokens_seen or 0
        seconds = self.step_seconds[-1] if self.step_seconds else 0.0
        row = {
            "step": float(state.global_step),
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_s": (tokens - self.tokens) / seconds if seconds > 0 else 0.0,
        }
        if logs.get("grad_norm") is not None:
            row["grad_norm"] = float(logs["grad_norm"])
        self.tokens = tokens
        self.rows.append(row)
        if self.sink:
            self.sink({k: v for k, v in row.items() if k != "step"}, state.global_step)
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            self.say(
                f"step {state.global_step}/{state.max_steps}: loss {row['loss']:.4f}, "
                f"{time.perf_counter() - self.start:.0f} s in this process"
            )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class DPOStepLog(TrainerCallback):
    """Collects trl's per-step DPO logs and forwards them to a sink (the flow streams them to MLflow)."""

    def __init__(self, sink: MetricsSink | None):
        self.sink = sink
        self.rows: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        row = {"step": float(state.global_step)}
        for key in (
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "rewards/chosen",
            "rewards/rejected",
            "learning_rate",
            "grad_norm",
        ):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                row[key] = float(value)
        self.rows.append(row)
        if self.sink is not None:
            self.sink({k: v for k, v in row.items() if k != "step"}, state.global_step)
