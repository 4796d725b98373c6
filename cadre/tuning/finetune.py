"""Supervised (Q)LoRA fine-tuning of a specialist's base model with peft + trl, resumable and guarded.

    data = build_training_data(...)                          # cadre.tuning.training_data
    work = work_dir(state_dir, "icd10-coder", data.fingerprint, training_config_hash(tuning, base_id, steps))
    result = train_adapter(data, tuning, base_model_dir=hf_dir, work_dir=work, max_steps=steps, threads=2)
    result.adapter_dir   # adapter_model.safetensors + adapter_config.json

What it does:

- `qlora`: the base loaded in 4-bit nf4 with double quantization (bitsandbytes) and prepared with
  `prepare_model_for_kbit_training`; `lora`: the base in full precision. LoRA rank, alpha, dropout
  and target modules come from `TuningSettings`; trl's `SFTTrainer` trains on the prompt-completion
  dataset, so the loss is on the completion only.
- CPU and CUDA: on CPU everything is fp32 with `bf16=False, use_cpu=True` (trl defaults to bf16)
  and torch threads set deliberately; on CUDA bf16 when the GPU supports it.
- On CPU the loss projects only the completion positions through the LM head. trl's fused head
  does that only on Triton devices and elsewhere scores every position; with Gemma 3's 262k-word
  vocabulary the head is then most of a step's work. Same loss and gradients (a unit test compares
  them), about 4x the steps per second on 2 CPU cores (`trainer_class`; bench/refresh.py).
- Resumable: a checkpoint every `checkpoint_every` steps under `work_dir`, which is keyed by
  (specialist, data fingerprint, training-config hash). Started again after a crash or a kill with
  the same data and config, training resumes from the last *complete* checkpoint; once finished, a
  rerun reuses the adapter instead of training again.
- The 4-bit repack trap: on CPUs with avx512_bf16 any no-grad forward on the 4-bit model
  repacks its weights and training then silently loses gradients, with only a UserWarning. Three
  guards: that warning is an exception while training; no 4-bit layer may be in the repacked layout
  when training starts or after any step; and on the first optimizer step of every process each
  LoRA B matrix must have a finite, non-zero gradient. Nothing evaluates the model while it trains:
  the held-out loss is computed once training has finished and the adapter is saved.
- Wall-time cap (`max_wall_seconds`, the smoke budget's): training stops at the first step that ends past
  it, writes a checkpoint there and saves the adapter it has to `capped/` (not `final/`), so the flow
  evaluates what exists and the next run with the same data and config resumes from that step.
- Progress: trl's progress bar, a time estimate from measured seconds per step printed after the
  first steps, and loss / learning rate / grad norm / tokens per second per step to a metrics sink
  (the refresh flow streams them to MLflow).

The refresh flow (`flows/refresh_adapter.py`) calls `train_adapter` through its training task;
`bench/refresh.py` compares it with a bare trl script.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.config.budget import RunBudget, parse_budget, wall_seconds
from cadre.config.tuning import SearchRange, TuningSettings, length_limit
from cadre.tuning.training_data import TrainingData

if TYPE_CHECKING:
    from cadre.config import CadreConfig, Specialist

RECIPE_VERSION = 1
"""Bumped when a code change alters what the same data and settings train into (invalidates checkpoints)."""

FINAL_DIR = "final"
CAPPED_DIR = "capped"
RESULT_FILE = "cadre-training.json"
TRAINER_STATE = "trainer_state.json"
FOUR_BIT_WARNING = r".*gemv_4bit.*autograd kernel.*"

MetricsSink = Callable[[dict[str, float], int], None]
"""Receives step metrics (`loss`, `learning_rate`, `grad_norm`, `tokens_per_s`, …) and the global step."""


class SilentGradientLossError(RuntimeError):
    """Training would go on without gradients reaching the adapter (the 4-bit repack trap or a broken graph)."""


@dataclass(frozen=True)
class TrainingResult:
    """What one training produced and what it cost.

    Attributes:
        adapter_dir: the PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`).
        work_dir: the keyed folder holding checkpoints and the adapter.
        method: `lora` or `qlora`.
        device: `cpu` or `cuda`.
        precision: `fp32` or `bf16`.
        global_step: optimizer steps completed in total.
        resumed_from_step: the checkpoint step this process continued from (0: started fresh).
        reused: training had already finished for this data and config; nothing was trained now.
        max_steps: the step budget.
        train_seconds: wall time of the training loop in this process.
        seconds_per_step: measured wall time per step in this process (None when no step ran).
        tokens_per_second: input tokens processed per second in this process.
        train_loss: mean training loss over the run (as the trainer reports it).
        heldout_loss: completion loss on the held-out examples after training (None without any).
        loss_curve: one row per logged step: step, loss, learning_rate, grad_norm, tokens_per_s.
        trainable_parameters: LoRA parameters trained.
        train_examples: examples in the training split.
        peak_rss_mb: peak resident memory of this process so far.
        config_hash: the training-config hash that keys `work_dir`.
        data_fingerprint: the training data's fingerprint.
        wall_capped: training stopped at `global_step` < `max_steps` because the wall-time cap was reached.
    """

    adapter_dir: Path
    work_dir: Path
    method: str
    device: str
    precision: str
    global_step: int
    resumed_from_step: int
    reused: bool
    max_steps: int
    train_seconds: float
    seconds_per_step: float | None
    tokens_per_second: float | None
    train_loss: float | None
    heldout_loss: float | None
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    train_examples: int = 0
    peak_rss_mb: float = 0.0
    config_hash: str = ""
    data_fingerprint: str = ""
    wall_capped: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"], data["work_dir"] = str(self.adapter_dir), str(self.work_dir)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingResult:
        return cls(**{**data, "adapter_dir": Path(data["adapter_dir"]), "work_dir": Path(data["work_dir"])})


# --- keys and folders ----------------------------------------------------------------------------


def training_config_hash(tuning: TuningSettings, base_model_id: str, max_steps: int | None) -> str:
    """sha256 of everything that changes what training does, beyond the data itself.

    The data choices (files, held-out share, max_length filtering) are already in the data
    fingerprint; `checkpoint_every` changes only how often progress is saved, so it is left out and
    a run may resume with a different value. `search` is left out too: a search trial with the declared settings
    trains in the same folder as a refresh without a search, and the best trial's adapter is the candidate's.
    """
    settings = tuning.model_dump(
        mode="json",
        exclude={"data", "from_eval_train", "heldout_fraction", "checkpoint_every", "max_steps", "search"},
    )
    key = {"recipe": RECIPE_VERSION, "base_model": base_model_id, "max_steps": max_steps, "tuning": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def work_dir(state_dir: Path, specialist: str, data_fingerprint: str, config_hash: str) -> Path:
    """The folder of one (specialist, data, config) training: checkpoints, then the final adapter."""
    return Path(state_dir) / "training" / specialist / f"{data_fingerprint[:16]}-{config_hash[:16]}"


def base_model_id(model_dir: Path, name: str) -> str:
    """A stable identity of the base model: its name plus a hash of its config and conversion marker."""
    digest = hashlib.sha256()
    for part in ("config.json", "cadre-model.json"):
        path = Path(model_dir) / part
        if path.exists():
            digest.update(path.read_bytes())
    return f"{name}@{digest.hexdigest()[:16]}"


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest `checkpoint-N` that was completely written (its trainer state is written last).

    A process killed while saving leaves a checkpoint folder without `trainer_state.json`; it is
    removed here so the next run neither resumes from it nor trips over it.
    """
    if not folder.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and suffix.isdigit()):
            continue
        if (path / TRAINER_STATE).exists():
            found.append((int(suffix), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return max(found)[1] if found else None


def completed_result(folder: Path) -> TrainingResult | None:
    """The result of a training that already finished in `folder`, if its adapter is complete."""
    marker = folder / FINAL_DIR / RESULT_FILE
    if not marker.exists():
        return None
    return TrainingResult.from_dict(json.loads(marker.read_text()))


def effective_steps(tuning: TuningSettings, budget: RunBudget, smoke_steps: int) -> int | None:
    """Optimizer steps of a budget: the smoke cap, or the configured steps (None: train by epochs)."""
    if parse_budget(budget) == "smoke":
        return min(smoke_steps, tuning.max_steps) if tuning.max_steps else smoke_steps
    return tuning.max_steps


@dataclass(frozen=True)
class RefreshPlan:
    """What one adapter refresh may use.

    Attributes:
        budget: the run's budget.
        max_steps: optimizer steps (None: `tuning.epochs` epochs).
        max_examples: examples rendered for training (None: all); more could never be reached.
        eval_cases: test cases the candidate and the champion are compared on (None: the whole split).
        max_wall_seconds: wall time of the training loop (None: no cap).
        decoding_dev_cases: dev cases the candidate's answer mode is re-chosen on (None: it answers as the serving
            program does; `tuning.decoding_dev_cases`, capped by the smoke budget's `decoding_dev_cases`).
    """

    budget: RunBudget
    max_steps: int | None
    max_examples: int | None
    eval_cases: int | None
    max_wall_seconds: float | None = None
    decoding_dev_cases: int | None = None


def plan_refresh(specialist: Specialist, budget: RunBudget) -> RefreshPlan:
    """The plan of one refresh: `full` reads `tuning` and `evaluation.max_cases`, `smoke` the specialist's `smoke`."""
    from cadre.tuning.training_data import examples_needed

    budget = parse_budget(budget)
    tuning = specialist.tuning
    steps = effective = effective_steps(tuning, budget, specialist.smoke.max_train_steps)
    eval_cases = specialist.smoke.max_eval_cases if budget == "smoke" else specialist.evaluation.max_cases
    batch_size = tuning.batch_size
    search = tuning.search
    if search is not None and search.trial_count(budget) and steps is not None:
        # Enough examples for the largest trial: more steps or bigger batches than declared must not repeat data.
        if budget == "full":
            steps = max(steps, _largest(search.space.get("max_steps"), steps))
        batch_size = max(batch_size, _largest(search.space.get("batch_size"), batch_size))
    needed = examples_needed(steps, batch_size, tuning.gradient_accumulation, tuning.heldout_fraction)
    decoding = tuning.decoding_dev_cases
    if decoding and budget == "smoke":
        decoding = min(decoding, specialist.smoke.decoding_dev_cases) or None
    return RefreshPlan(budget, effective, needed, eval_cases, wall_seconds(specialist, budget), decoding)


def _largest(values: list | SearchRange | None, default: int) -> int:
    if values is None:
        return default
    return int(values.high) if isinstance(values, SearchRange) else max(int(v) for v in values)


# --- model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """Where and in which precision training runs."""

    device: str
    bf16: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def detect_hardware(device: str | None = None) -> Hardware:
    """CUDA when available (bf16 where the GPU supports it), else CPU in fp32."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return Hardware("cuda", bool(torch.cuda.is_bf16_supported()))
    return Hardware("cpu", False)


def load_model(base_model_dir: Path, tuning: TuningSettings, hardware: Hardware):
    """The base model and tokenizer, quantized to 4-bit nf4 for `qlora`, wrapped with fresh LoRA layers."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if hardware.bf16 else torch.float32
    device_map = {"": torch.cuda.current_device()} if hardware.device == "cuda" else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tuning.method == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            base_model_dir, quantization_config=quantization, dtype=dtype, device_map=device_map
        )
        # Gradient checkpointing trades ~30 % speed for activation memory a 270M model does not need.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype, device_map=device_map)
    model.config.use_cache = False
    lora = LoraConfig(
        r=tuning.rank,
        lora_alpha=tuning.alpha,
        lora_dropout=tuning.dropout,
        target_modules=tuning.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


def sft_config(
    tuning: TuningSettings, hardware: Hardware, output_dir: Path, max_steps: int | None, max_length: int | None = None
):
    """trl's `SFTConfig` for the settings: the one place training arguments are decided."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=tuning.epochs or 1.0,
        per_device_train_batch_size=tuning.batch_size,
        per_device_eval_batch_size=tuning.batch_size,
        gradient_accumulation_steps=tuning.gradient_accumulation,
        learning_rate=tuning.learning_rate,
        lr_scheduler_type=tuning.lr_scheduler,
        warmup_steps=tuning.warmup_ratio,  # a float below 1 is a ratio of the total steps
        max_length=max_length or length_limit(tuning.max_length),
        completion_only_loss=True,
        packing=False,
        seed=tuning.seed,
        data_seed=tuning.seed,
        bf16=hardware.bf16,
        use_cpu=hardware.device == "cpu",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="steps",
        save_steps=tuning.checkpoint_every,
        save_total_limit=2,
        eval_strategy="no",  # never a forward on the model while it trains (the 4-bit trap)
        prediction_loss_only=True,  # the held-out evaluation after training needs the loss, not logits
        report_to="none",  # metrics go to the flow's own MLflow run through a callback
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=hardware.device == "cuda",
    )


# --- trainer -------------------------------------------------------------------------------------


def completion_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
    """Next-token loss on the completion tokens only, projecting just those positions through the LM head.

    The same quantity trl's fused LM head computes (sum of the completion tokens' negative
    log-likelihoods over their count, or over `num_items_in_batch` across gradient accumulation),
    without scoring the prompt positions whose labels are ignored anyway.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state[:, :-1]
    logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    total = F.cross_entropy(logits, labels[mask], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return total / count


def _unsupported_head(config: CadreConfig) -> str | None:
    """Why `completion_loss` cannot stand in for trl's fused head on this model, or None."""
    text = config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling", "output_router_logits"):
        if getattr(text, name, None) not in (None, False, 1, 1.0):
            return f"its config sets {name}"
    return None


def trainer_class(hardware: Hardware, model: Any):
    """trl's `SFTTrainer`, or on CPU its subclass that computes the loss on the completion positions only."""
    from trl import SFTTrainer

    if hardware.device != "cpu" or _unsupported_head(model.config):
        return SFTTrainer

    class CompletionLossSFTTrainer(SFTTrainer):
        """`SFTTrainer` whose loss projects only the completion positions through the LM head (CPU)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = completion_loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return CompletionLossSFTTrainer


def wall_cap_message(what: str, stopped_at: int, max_steps: int, max_seconds: float, then: str) -> str:
    """The sentence a run says and records (`WALL_CAP_TAG`) when its training stopped at the wall-time cap."""
    return (
        f"{what} stopped at the wall-time cap ({max_seconds:.0f} s) after step {stopped_at} of {max_steps}: "
        f"the candidate is the adapter of step {stopped_at}{then}"
    )


# --- training ------------------------------------------------------------------------------------


def train_adapter(
    data: TrainingData,
    tuning: TuningSettings,
    *,
    base_model_dir: Path,
    work_dir: Path,
    max_steps: int | None,
    threads: int,
    device: str | None = None,
    sink: MetricsSink | None = None,
    say: Callable[[str], None] = print,
    progress_bar: bool = True,
    config_hash: str = "",
    extra_callbacks: Sequence[Any] = (),
    max_wall_seconds: float | None = None,
) -> TrainingResult:
    """Fine-tune a LoRA adapter on `data`, resuming from `work_dir`'s last checkpoint if there is one.

    Args:
        data: the rendered training data (its held-out split gives the final eval loss).
        tuning: the specialist's tuning settings (method, LoRA and optimizer settings).
        base_model_dir: the base model as transformers safetensors.
        work_dir: the keyed folder (see `work_dir()`): checkpoints, then `final/` with the adapter.
        max_steps: optimizer steps (None: `tuning.epochs` epochs).
        threads: torch intra-op threads on CPU.
        device: `cpu` or `cuda`; default CUDA when available.
        sink: receives step metrics (e.g. an MLflow logger).
        say: where progress lines and the time estimate go.
        progress_bar: show trl's progress bar.
        config_hash: recorded in the result (lineage).
        extra_callbacks: more `TrainerCallback`s (tests use one to stop a run at a chosen step).
        max_wall_seconds: stop at the first step past this many seconds of training (checkpointed there; the
            adapter goes to `capped/` and the result says `wall_capped`); None: no cap.

    Returns:
        The result; `adapter_dir` holds the adapter.

    Raises:
        SilentGradientLossError: the adapter would not learn (the 4-bit repack trap).
    """
    done = completed_result(work_dir)
    if done is not None:
        say(f"training: already finished at step {done.global_step} in {work_dir}; reusing the adapter")
        return TrainingResult.from_dict(
            {
                **done.to_dict(),
                "reused": True,
                "resumed_from_step": done.global_step,
                "train_seconds": 0.0,
                "seconds_per_step": None,
                "tokens_per_second": None,
            }
        )
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cadre.tuning.callbacks import FourBitGuard, QuietProgress, StepMetrics, WallCap

    hardware = detect_hardware(device)
    if hardware.device == "cpu":
        torch.set_num_threads(threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_seed(tuning.seed)  # the LoRA matrices are initialised before the trainer would seed anything
    model, tokenizer = load_model(base_model_dir, tuning, hardware)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = Dataset.from_dict(data.columns("train"))
    heldout_set = Dataset.from_dict(data.columns("heldout")) if data.heldout else None
    metrics = StepMetrics(sink, say)
    wall_cap = WallCap(max_wall_seconds) if max_wall_seconds is not None else None
    callbacks = [FourBitGuard(), metrics, *([wall_cap] if wall_cap else []), *extra_callbacks]
    trainer = trainer_class(hardware, model)(
        model=model,
        args=sft_config(tuning, hardware, work_dir, max_steps, data.max_length or None),
        train_dataset=train_set,
        eval_dataset=heldout_set,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress_bar:
        trainer.add_callback(QuietProgress)
    checkpoint = last_complete_checkpoint(work_dir)
    resumed_from = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0
    if checkpoint:
        say(f"training: resuming from {checkpoint.name} of {work_dir}")
    started = time.perf_counter()
    with warnings.catch_warnings():
        # The only symptom of the 4-bit repack trap is this warning; make it stop the run.
        warnings.filterwarnings("error", message=FOUR_BIT_WARNING)
        try:
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except UserWarning as warning:
            if not re.match(FOUR_BIT_WARNING, str(warning)):
                raise
            raise SilentGradientLossError(
                "bitsandbytes backpropagated through its 4-bit inference kernel, which has no autograd: the 4-bit weights "
                "were repacked by a no-grad forward (an evaluation or generate() on the model being trained), and from "
                "here on gradients would be silently lost. Never evaluate or generate on the model being trained."
            ) from warning
    train_seconds = time.perf_counter() - started
    steps_here = trainer.state.global_step - resumed_from
    capped = wall_cap is not None and wall_cap.stopped_at is not None
    if capped:
        say(
            wall_cap_message(
                "training",
                trainer.state.global_step,
                trainer.state.max_steps,
                max_wall_seconds,
                "; the next run with the same data and settings resumes there",
            )
        )

    # A capped adapter is not the finished one: `final/` would make the next run reuse it instead of resuming.
    final = work_dir / (CAPPED_DIR if capped else FINAL_DIR)
    partial = work_dir / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(partial, safe_serialization=True)
    # Only now, with the adapter saved and training over, may anything run a no-grad forward.
    heldout_loss = None
    if heldout_set is not None:
        heldout_loss = float(trainer.evaluate()["eval_loss"])
        say(f"held-out loss {heldout_loss:.4f} on {len(data.heldout)} examples")
    curve = _loss_curve(trainer.state.log_history, metrics.rows)
    result = TrainingResult(
        adapter_dir=final,
        work_dir=work_dir,
        method=tuning.method,
        device=hardware.device,
        precision=hardware.precision,
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_from,
        reused=False,
        max_steps=trainer.state.max_steps,
        train_seconds=train_seconds,
        seconds_per_step=train_seconds / steps_here if steps_here else None,
        tokens_per_second=_tokens_per_second(metrics, train_seconds),
        train_loss=_finite(output.training_loss),
        heldout_loss=heldout_loss,
        loss_curve=curve,
        trainable_parameters=trainable,
        train_examples=len(data.train),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        config_hash=config_hash,
        data_fingerprint=data.fingerprint,
        wall_capped=capped,
    )
    (partial / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.replace(final)
    if not capped:
        for old in [*work_dir.glob("checkpoint-*"), work_dir / CAPPED_DIR]:  # complete: no longer needed
            shutil.rmtree(old, ignore_errors=True)
    del trainer, model
    return result


def _loss_curve(history: list[dict[str, Any]], measured: list[dict[str, float]]) -> list[dict[str, float]]:
    """Loss per logged step over the whole training (checkpointed history included), with this process's throughput."""
    throughput = {int(row["step"]): row.get("tokens_per_s", 0.0) for row in measured}
    curve = []
    for entry in history:
        if "loss" not in entry:
            continue
        step = int(entry["step"])
        row = {
            "step": float(step),
            "loss": float(entry["loss"]),
            "learning_rate": float(entry.get("learning_rate", 0.0)),
        }
        if entry.get("grad_norm") is not None:
            row["grad_norm"] = float(entry["grad_norm"])
        if step in throughput:
            row["tokens_per_s"] = throughput[step]
        curve.append(row)
    return curve


def _tokens_per_second(metrics: Any, seconds: float) -> float | None:
    rates = [row["tokens_per_s"] for row in metrics.rows if row.get("tokens_per_s")]
    return sum(rates) / len(rates) if rates and seconds > 0 else None


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
