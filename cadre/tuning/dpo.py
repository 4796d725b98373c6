"""DPO on a specialist's LoRA adapter from user corrections, with trl's `DPOTrainer` (no separate reference model).

    result = train_dpo(pairs, feedback_settings, tuning_settings, base_model_dir=hf_dir,
                       champion_adapter_dir=champion_peft_dir_or_None, work_dir=folder, max_steps=40, threads=2)
    result.adapter_dir   # adapter_model.safetensors + adapter_config.json, ready for cadre.tuning.adapter_export.export_adapter

What it does:

- Starting point: the champion adapter when there is one (loaded trainable; trl copies it into a
  frozen `ref` adapter, so the reference is the champion itself), else a fresh LoRA on the base
  model (rank, alpha, dropout and target modules from the specialist's `tuning`; the reference is
  the base with the adapter disabled). Either way no second model is loaded.
- Always plain LoRA on a full-precision base, also when `tuning.method` is `qlora`: DPO runs no-grad
  reference forwards on the model it trains, which on a 4-bit base is exactly the repack trap of
  (gradients are silently lost; see the repack trap in cadre/tuning/finetune.py). The 270M base in fp32 peaks at ~4.2 GB (batch 2, ~150-token prompts).
- CPU: fp32 with `bf16=False, use_cpu=True` (trl defaults to bf16) and torch threads set
  deliberately; CUDA: bf16 where supported. The reference log-probs are computed once before
  training (`precompute_ref_log_probs`) when the steps see every pair at least once, which saves
  one forward per pair per epoch after the first; a run too short for that computes them on the fly.
- Loss: DPO's sigmoid loss plus an NLL (`sft`) term on the chosen completion, trl's multi-loss
  (the RPO recipe). On a base model whose answers are mostly junk, pure DPO can lower the
  likelihood of both completions and still "win" the margin; the NLL term makes the corrected
  answer the one greedy decoding produces. `loss_types=("sigmoid",)` gives pure DPO.
- Wall-time cap (`max_wall_seconds`, the smoke budget's): training stops at the first step that ends past
  it; the adapter of that step is the candidate and the result says `wall_capped`.
- Pairs longer than `tuning.max_length` tokens are dropped, never truncated (a cut prompt would teach
  answers to questions the model was not asked).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.config.budget import RunBudget, parse_budget, wall_seconds
from cadre.config.tuning import length_limit
from cadre.feedback.store import PreferencePair

if TYPE_CHECKING:
    from cadre.config import FeedbackSettings, Specialist, TuningSettings

MetricsSink = Callable[[dict[str, float], int], None]
"""Receives step metrics (`loss`, `rewards/accuracies`, `rewards/margins`, …) and the global step."""

DEFAULT_LOSS = ("sigmoid", "sft")


@dataclass(frozen=True)
class DPOResult:
    """What one DPO run produced and what it cost.

    Attributes:
        adapter_dir: the trained PEFT adapter (only the trained one, not trl's `ref` copy).
        started_from: `champion adapter` or `fresh LoRA`.
        pairs: pairs trained on (after dropping those longer than max_length).
        dropped_too_long: pairs dropped for length.
        steps: optimizer steps run.
        train_seconds: wall time of the training loop.
        seconds_per_step: measured wall time per step.
        loss_curve: one row per step: step, loss, rewards/accuracies, rewards/margins, learning_rate, grad_norm.
        final_reward_accuracy: share of pairs in the last logged batch where chosen beats rejected.
        device: `cpu` or `cuda`.
        precision: `fp32` or `bf16`.
        loss_types: trl loss types combined.
        peak_rss_mb: peak resident memory of the process.
        max_steps: the step budget.
        wall_capped: training stopped before `max_steps` because the wall-time cap was reached.
    """

    adapter_dir: Path
    started_from: str
    pairs: int
    dropped_too_long: int
    steps: int
    train_seconds: float
    seconds_per_step: float
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    final_reward_accuracy: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    loss_types: tuple[str, ...] = DEFAULT_LOSS
    peak_rss_mb: float = 0.0
    max_steps: int = 0
    wall_capped: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


@dataclass(frozen=True)
class FeedbackPlan:
    """What one learn-from-feedback run may use.

    Attributes:
        budget: the run's budget.
        max_steps: DPO optimizer steps.
        eval_cases: test cases compared besides the feedback slice (None: the whole split).
        max_wall_seconds: wall time of the DPO training loop (None: no cap).
    """

    budget: RunBudget
    max_steps: int
    eval_cases: int | None
    max_wall_seconds: float | None = None


def plan_feedback(specialist: Specialist, budget: RunBudget) -> FeedbackPlan:
    """`full` reads `feedback.max_steps` and `evaluation.max_cases`; `smoke` caps them with the specialist's `smoke` budget."""
    budget = parse_budget(budget)
    steps = specialist.feedback.max_steps
    if budget == "smoke":
        smoke = specialist.smoke
        return FeedbackPlan(
            budget, min(steps, smoke.max_train_steps), smoke.max_eval_cases, wall_seconds(specialist, budget)
        )
    return FeedbackPlan(budget, steps, specialist.evaluation.max_cases)


def train_dpo(
    pairs: Sequence[PreferencePair],
    settings: FeedbackSettings,
    tuning: TuningSettings,
    *,
    base_model_dir: Path,
    champion_adapter_dir: Path | None,
    work_dir: Path,
    max_steps: int,
    threads: int,
    sink: MetricsSink | None = None,
    loss_types: Sequence[str] = DEFAULT_LOSS,
    seed: int = 0,
    max_wall_seconds: float | None = None,
) -> DPOResult:
    """Train a DPO candidate adapter on preference pairs.

    Args:
        pairs: prompt / chosen / rejected, rendered in the serving prompt format.
        settings: the specialist's `FeedbackSettings` (beta, learning rate).
        tuning: the specialist's `TuningSettings` (LoRA shape of a fresh adapter, batch size, max_length).
        base_model_dir: the transformers base model (safetensors).
        champion_adapter_dir: the champion's PEFT adapter to continue from, or None for a fresh LoRA.
        work_dir: scratch folder (trainer output, the saved adapter under `adapter/`).
        max_steps: optimizer steps.
        threads: torch threads on CPU.
        sink: receives per-step metrics.
        loss_types: trl loss types, combined with equal weights.
        seed: seeds LoRA initialisation and data order.
        max_wall_seconds: stop at the first step past this many seconds of training; None: no cap.

    Raises:
        ValueError: no pair fits in `tuning.max_length` tokens.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from cadre.tuning.callbacks import DPOStepLog, WallCap
    from cadre.tuning.finetune import detect_hardware

    hardware = detect_hardware()
    if hardware.device == "cpu":
        torch.set_num_threads(max(1, threads))
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = length_limit(tuning.max_length)
    kept = [p for p in pairs if _tokens(tokenizer, p.prompt + max(p.chosen, p.rejected, key=len)) <= limit]
    if not kept:
        raise ValueError(f"none of the {len(pairs)} preference pairs fits in max_length={limit} tokens")

    dtype = torch.bfloat16 if hardware.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype)
    model.config.use_cache = False
    peft_config = None
    if champion_adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(champion_adapter_dir), is_trainable=True)
        started_from = "champion adapter"
    else:
        peft_config = LoraConfig(
            r=tuning.rank,
            lora_alpha=tuning.alpha,
            lora_dropout=tuning.dropout,
            target_modules=tuning.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        started_from = "fresh LoRA"

    work_dir = Path(work_dir)
    batch_size = min(tuning.batch_size, len(kept))
    # One reference forward per pair up front, or one per pair seen during training: whichever is fewer.
    precompute = max_steps * batch_size >= len(kept)
    args = DPOConfig(
        output_dir=str(work_dir / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",  # tens of steps: a decaying schedule would spend half of them barely moving
        beta=settings.beta,
        loss_type=list(loss_types),
        max_length=limit,
        precompute_ref_log_probs=precompute,
        bf16=hardware.bf16,
        use_cpu=hardware.device == "cpu",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=hardware.device == "cuda",
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict(
        {"prompt": [p.prompt for p in kept], "chosen": [p.chosen for p in kept], "rejected": [p.rejected for p in kept]}
    )
    log = DPOStepLog(sink)
    wall_cap = WallCap(max_wall_seconds, checkpoint=False) if max_wall_seconds is not None else None
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log, *([wall_cap] if wall_cap else [])],
    )
    trainer.remove_callback(PrinterCallback)  # the sink reports each step; no dict printed per step
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = work_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    steps = int(trainer.state.global_step)
    accuracy = next((row["rewards/accuracies"] for row in reversed(log.rows) if "rewards/accuracies" in row), None)
    return DPOResult(
        adapter_dir=adapter_dir,
        started_from=started_from,
        pairs=len(kept),
        dropped_too_long=len(pairs) - len(kept),
        steps=steps,
        train_seconds=seconds,
        seconds_per_step=seconds / max(steps, 1),
        loss_curve=log.rows,
        final_reward_accuracy=accuracy,
        device=hardware.device,
        precision=hardware.precision,
        loss_types=tuple(loss_types),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        max_steps=max_steps,
        wall_capped=wall_cap is not None and wall_cap.stopped_at is not None,
    )


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"]) + 1  # trl appends EOS to completions
