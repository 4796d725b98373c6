"""Training throughput of the refresh flow's trainer vs. a bare trl script, side by side in one run.

For each method (LoRA, QLoRA) two fresh processes train the same base model on the same rendered
examples with the same settings:

- `cadre`: `cadre.tuning.finetune.train_adapter`, the function the refresh flow's training task calls
  (its guards, step-metrics callback, checkpoints and final save included);
- `bare trl`: the few lines a user writes with peft + trl (`SFTTrainer(..., peft_config=...)`), no
  Cadre code at all.

Reported: steady-state steps/s (steps after the first, from per-step timestamps), and the process's
peak RSS. Each variant runs in its own process, so memory numbers do not bleed into each other.

The examples are the demo specialist's train split rendered with `cadre.runtime.prompt`, each with
five candidate codes (the gold code and its neighbours in ICD-10-CM, titles from `simple-icd-10-cm`)
standing in for retrieved passages, so prompts have the length they have in production without an
index.

A third table times the hyperparameter search (`tuning.search`): seconds per trial of `run_search` (LoRA, the
study in SQLite, a pruning report every step) against one bare trl run of the same steps.

Run: `.venv/bin/python bench/refresh.py [--steps 12] [--methods lora,qlora] [--search-trials 2]` (about 1 minute per
variant on 2 quiet cores; a GPU is used when present, otherwise it says CUDA was not available).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cadre.config.tuning import length_limit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

console = Console(width=130)

TIMER = """
import time
from transformers import TrainerCallback

class StepTimer(TrainerCallback):
    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
"""

CADRE_DATA = """
import json, resource, sys
from pathlib import Path
from cadre.config.tuning import TuningSettings
from cadre.tuning.finetune import train_adapter
from cadre.tuning.training_data import TrainingData, TrainingExample

spec = json.loads(Path(sys.argv[1]).read_text())
examples = [TrainingExample(e["prompt"], e["completion"], "bench") for e in spec["examples"]]
data = TrainingData(train=examples, heldout=[], fingerprint="bench", counts={})
"""
"""What both Cadre variants start with: the spec and its examples as training data."""

CADRE_VARIANT = (
    TIMER
    + CADRE_DATA
    + """
timer = StepTimer()
result = train_adapter(data, TuningSettings(**spec["tuning"]), base_model_dir=Path(spec["model"]), work_dir=Path(spec["work"]),
                       max_steps=spec["steps"], threads=spec["threads"], sink=lambda metrics, step: None, say=lambda line: None,
                       progress_bar=False, extra_callbacks=[timer])
print("BENCH " + json.dumps({"stamps": timer.stamps, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "loss": result.loss_curve[-1]["loss"]}))
"""
)

BARE_VARIANT = (
    TIMER
    + """
import json, resource, sys
from pathlib import Path
import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import SFTConfig, SFTTrainer

spec = json.loads(Path(sys.argv[1]).read_text())
began = time.perf_counter()
tuning = spec["tuning"]
cuda = torch.cuda.is_available()
bf16 = cuda and torch.cuda.is_bf16_supported()
dtype = torch.bfloat16 if bf16 else torch.float32
if not cuda:
    torch.set_num_threads(spec["threads"])
set_seed(tuning["seed"])
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
device_map = {"": 0} if cuda else "cpu"
if tuning["method"] == "qlora":
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quantization, dtype=dtype, device_map=device_map)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
else:
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, device_map=device_map)
dataset = Dataset.from_dict({"prompt": [e["prompt"] for e in spec["examples"]], "completion": [e["completion"] for e in spec["examples"]]})
args = SFTConfig(output_dir=spec["work"], max_steps=spec["steps"], per_device_train_batch_size=tuning["batch_size"],
                 gradient_accumulation_steps=tuning["gradient_accumulation"], learning_rate=tuning["learning_rate"],
                 lr_scheduler_type=tuning["lr_scheduler"], warmup_steps=tuning["warmup_ratio"], max_length=tuning["max_length"],
                 seed=tuning["seed"], bf16=bf16, use_cpu=not cuda, gradient_checkpointing=False, logging_steps=1,
                 save_strategy="no", report_to="none", disable_tqdm=True)
lora = LoraConfig(r=tuning["rank"], lora_alpha=tuning["alpha"], lora_dropout=tuning["dropout"], target_modules=tuning["target_modules"],
                  task_type="CAUSAL_LM")
timer = StepTimer()
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[timer])
output = trainer.train()
loss = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
print("BENCH " + json.dumps({"stamps": timer.stamps, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss,
                            "run_s": time.perf_counter() - began}))
"""
)

SEARCH_VARIANT = (
    TIMER
    + CADRE_DATA
    + """
from cadre.tuning.search import run_search

rate = spec["tuning"]["learning_rate"]
tuning = TuningSettings(**{**spec["tuning"], "search": {"space": {"learning_rate": [rate, rate * 2]}, "prune": False}})
timer = StepTimer()

def train(settings, steps, report, number):
    sink = lambda metrics, step: report(step, metrics["loss"]) if "loss" in metrics else None
    return train_adapter(data, settings, base_model_dir=Path(spec["model"]), work_dir=Path(spec["work"]) / f"trial-{number}",
                         max_steps=steps, threads=spec["threads"], sink=sink, say=lambda line: None, progress_bar=False,
                         extra_callbacks=[timer])

result = run_search(tuning.search, tuning, trials=spec["trials"], steps=spec["steps"], storage=Path(spec["work"]) / "study.db",
                    study="bench", metric="-loss", train=train, score=lambda r, s, n: -r.loss_curve[-1]["loss"], say=lambda line: None)
print("BENCH " + json.dumps({"stamps": timer.stamps[-spec["steps"]:], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "loss": -result.best.dev_score, "trial_s": [t.seconds for t in result.trials]}))
"""
)


def bench_examples(count: int, seed: int) -> list[dict[str, str]]:
    """The demo's train split rendered as the program prompts it, with five ICD-10-CM neighbours as candidates."""
    import random

    import simple_icd_10_cm as icd

    from cadre.config import load_config
    from cadre.demo.icd10 import billable_codes
    from cadre.evaluation.results import load_cases
    from cadre.runtime.prompt import PromptSpec, render_completion, render_prompt

    config = load_config(ROOT / "pipelines.yaml")
    settings = config.specialist("icd10-coder")
    spec = PromptSpec.from_settings(settings.program)
    codes = billable_codes()
    position = {code: i for i, code in enumerate(codes)}
    rng = random.Random(seed)
    examples = []
    for case in load_cases(config.resolve(settings.evaluation.suite), "train", count):
        at = position.get(case["code"], 0)
        neighbours = [codes[i] for i in range(max(0, at - 2), min(len(codes), at + 3))]
        rng.shuffle(neighbours)
        passages = [f"{code} — {icd.get_description(code)}" for code in neighbours[: settings.program.retrieve_k]]
        inputs = (
            {spec.context_field: passages, "phrase": case["phrase"]}
            if spec.context_field
            else {"phrase": case["phrase"]}
        )
        examples.append(
            {"prompt": render_prompt(spec, inputs), "completion": render_completion(spec, {"code": case["code"]})}
        )
    return examples


def run_variant(script: str, spec_path: Path) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, str(spec_path)], check=False, capture_output=True, text=True, env=env, cwd=ROOT
    )
    line = next((line for line in done.stdout.splitlines() if line.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"variant failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    found = json.loads(line[len("BENCH ") :])
    stamps = found["stamps"]
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {
        "steps_per_s": steady,
        "rss_mb": found["rss_mb"],
        "loss": found["loss"],
        "wall_s": time.perf_counter() - started,
        "run_s": found.get("run_s"),
        "trial_s": found.get("trial_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per variant (the first is excluded from steps/s)"
    )
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: project.threads.torch)")
    parser.add_argument(
        "--search-trials",
        type=int,
        default=2,
        help="also time a hyperparameter search of this many trials (LoRA) against bare trl runs (0: skip)",
    )
    args = parser.parse_args()

    import torch

    from cadre.config import load_config
    from cadre.runtime.base_model import ensure_hf_model

    config = load_config(ROOT / "pipelines.yaml")
    settings = config.specialist("icd10-coder")
    threads = args.threads or config.project.threads.torch
    model = ensure_hf_model(config)
    device = (
        f"CUDA ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else "CPU — CUDA was not available on this machine"
    )
    examples = bench_examples(
        settings.tuning.batch_size * settings.tuning.gradient_accumulation * args.steps, settings.tuning.seed
    )
    console.print(
        f"[bold]Refresh training throughput[/bold]: {settings.base_model}, {args.steps} steps, batch {settings.tuning.batch_size}, "
        f"max_length {settings.tuning.max_length}, r={settings.tuning.rank}, {threads} torch threads; device: {device}"
    )

    table = Table(
        title="cadre.finetune.train_adapter vs. a bare trl script (same model, data, settings; fresh process each)"
    )
    for column in (
        "method",
        "implementation",
        "steps/s",
        "s/step",
        "peak RSS (MB)",
        "final loss",
        "process wall (s)",
        "cadre / bare",
    ):
        table.add_column(column, justify="left" if column in ("method", "implementation") else "right")
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            tuning = settings.tuning.model_copy(
                update={
                    "method": method,
                    "max_steps": args.steps,
                    "checkpoint_every": 10_000,
                    "max_length": length_limit(settings.tuning.max_length),  # a number for the bare script too
                    "search": None,  # one training, the declared settings with these steps
                }
            )
            results = {}
            for name, script in (("bare trl", BARE_VARIANT), ("cadre", CADRE_VARIANT)):
                spec_path = Path(scratch) / f"{method}-{name.replace(' ', '-')}.json"
                spec_path.write_text(
                    json.dumps(
                        {
                            "model": str(model),
                            "work": str(Path(scratch) / spec_path.stem),
                            "steps": args.steps,
                            "threads": threads,
                            "tuning": tuning.model_dump(mode="json"),
                            "examples": examples,
                        }
                    )
                )
                console.print(f"  running {method} / {name} …")
                results[name] = run_variant(script, spec_path)
            for name, found in results.items():
                ratio = found["steps_per_s"] / results["bare trl"]["steps_per_s"]
                table.add_row(
                    method,
                    name,
                    f"{found['steps_per_s']:.3f}",
                    f"{1 / found['steps_per_s']:.2f}",
                    f"{found['rss_mb']:,.0f}",
                    f"{found['loss']:.3f}",
                    f"{found['wall_s']:.0f}",
                    f"{ratio:.3f}" if name == "cadre" else "",
                )
        if args.search_trials:
            search = search_overhead(scratch, model, settings, examples, threads, args.steps, args.search_trials)
    console.print(table)
    console.print(
        "steps/s counts steps 2…N (the first step pays one-off costs); peak RSS is the process's maximum resident set."
    )
    if args.search_trials:
        console.print(search)


def search_overhead(
    scratch: str, model: Path, settings, examples: list, threads: int, steps: int, trials: int
) -> Table:
    """Seconds per search trial (`cadre.tuning.search.run_search` training through `train_adapter`, the study in
    SQLite, pruning reports on every step) against one bare trl run of the same steps (model load + training, both
    timed inside their process, imports excluded). The trials' dev scoring is the refresh's evaluation and is not
    timed here: this is what the search adds around the training itself."""
    tuning = settings.tuning.model_copy(
        update={
            "method": "lora",
            "max_steps": steps,
            "checkpoint_every": 10_000,
            "search": None,
            "max_length": length_limit(settings.tuning.max_length),
        }
    )
    found = {}
    for name, script in (("bare trl", BARE_VARIANT), ("cadre search", SEARCH_VARIANT)):
        spec_path = Path(scratch) / f"search-{name.replace(' ', '-')}.json"
        spec_path.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "work": str(Path(scratch) / spec_path.stem),
                    "steps": steps,
                    "threads": threads,
                    "trials": trials,
                    "tuning": tuning.model_dump(mode="json"),
                    "examples": examples,
                }
            )
        )
        console.print(f"  running search overhead / {name} …")
        found[name] = run_variant(script, spec_path)
    per_trial = sum(found["cadre search"]["trial_s"]) / len(found["cadre search"]["trial_s"])
    bare = found["bare trl"]["run_s"]
    table = Table(
        title=f"hyperparameter search: seconds per trial ({trials} LoRA trials of {steps} steps) vs. one bare trl run"
    )
    for column in ("implementation", "s per run (load + train)", "steps/s", "cadre / bare"):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    table.add_row("bare trl (one run)", f"{bare:.1f}", f"{found['bare trl']['steps_per_s']:.3f}", "")
    table.add_row(
        f"cadre search (mean of {trials} trials)",
        f"{per_trial:.1f}",
        f"{found['cadre search']['steps_per_s']:.3f}",
        f"{per_trial / bare:.3f}",
    )
    return table


if __name__ == "__main__":
    main()
