"""(Q)LoRA fine-tuning on a tiny random 2-layer Gemma 3 and a tokenizer trained in this session:
training runs and learns, metrics stream, checkpoints resume, the 4-bit repack trap is stopped.

The repack trap happens only on some CPUs (bitsandbytes repacks 4-bit weights on a no-grad forward only where
its native library reports avx512_bf16). The `four_bit_trap` fixture finds out once per session by doing what
triggers it on one tiny 4-bit layer; the guard tests then reproduce the trap and expect the guard to stop it,
or, where it cannot happen, expect the guard to stay quiet and training to be right. Each says which case ran
in pytest's warnings summary (`FourBitTrapCase`) and as a junit property.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from cadre.config.tuning import TuningSettings
from cadre.platform.signals import Terminated, terminate_on_sigterm
from cadre.runtime.prompt import FieldSpec, PromptSpec
from cadre.tuning.callbacks import FourBitGuard
from cadre.tuning.finetune import (
    SilentGradientLossError,
    detect_hardware,
    effective_steps,
    last_complete_checkpoint,
    load_model,
    sft_config,
    train_adapter,
    trainer_class,
    training_config_hash,
    work_dir,
)
from cadre.tuning.training_data import Record, build_training_data, token_counter

SPEC = PromptSpec("Answer with the ICD-10-CM code.", (FieldSpec("phrase"),), (FieldSpec("code"),))
ROWS = [
    {
        "phrase": f"disease number {i} of the {['heart', 'lung', 'skin'][i % 3]}",
        "code": f"{'IJL'[i % 3]}{i:02d}.{i % 7}",
    }
    for i in range(48)
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Gemma 3 with random weights and a byte-level BPE tokenizer trained on the task's text."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    corpus = [f"{SPEC.instruction}\n\n---\n\nPhrase: {row['phrase']}\nCode: {row['code']}\n" for row in ROWS]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = Gemma3TextConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tiny_model):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    records = [Record("mem", n, row) for n, row in enumerate(ROWS, 1)]
    return build_training_data(
        records, SPEC, count_tokens=token_counter(tokenizer), max_length=64, heldout_fraction=0.1, seed=0
    )


class FourBitTrapCase(UserWarning):
    """Which case of a 4-bit guard test ran on this CPU (shown in pytest's warnings summary)."""


@pytest.fixture(scope="session")
def four_bit_trap() -> bool:
    """Whether this CPU has the 4-bit repack trap, found by triggering it on one tiny 4-bit layer.

    A no-grad forward in eval mode, then a training forward and backward: the trap is there when the forward
    repacked the weights or the backward no longer reaches the layer's input. Probing what bitsandbytes does,
    rather than reading CPU flags, stays right if its rule for when to repack changes.
    """
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.quant_state is not None, "the probe layer was not quantized to 4-bit"
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    repacked = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    layer.train()
    x = torch.randn(2, 64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trap's own warning; what counts is whether the gradient arrives
        out = layer(x)
        if out.requires_grad:
            out.sum().backward()
    gradient_flows = x.grad is not None and bool(x.grad.abs().sum() > 0)
    return repacked or not gradient_flows


def say_which_case(trap: bool, record_property) -> None:
    record_property("four_bit_trap", "occurs" if trap else "cannot occur")
    warnings.warn(
        FourBitTrapCase(
            "4-bit repack trap occurs on this CPU: reproduced it, the guard must stop the run"
            if trap
            else "4-bit repack trap cannot occur on this CPU (bitsandbytes does not repack here): "
            "checked the guard stays quiet and LoRA still learns"
        ),
        stacklevel=2,
    )


def four_bit_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit"]


def repacked_layers(model) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in four_bit_layers(model))


def tuning(**overrides) -> TuningSettings:
    settings = {
        "method": "lora",
        "rank": 4,
        "alpha": 8,
        "max_steps": 2,
        "batch_size": 4,
        "checkpoint_every": 2,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
    } | overrides
    return TuningSettings(**settings)


def train(data, tiny_model, folder, settings, **options):
    return train_adapter(
        data,
        settings,
        base_model_dir=tiny_model,
        work_dir=folder,
        max_steps=settings.max_steps,
        threads=1,
        progress_bar=False,
        **options,
    )


class KillAfterCheckpoint(TrainerCallback):
    """Dies like a killed process right after the checkpoint of `step` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint-{self.step}")


class EvaluateWhileTraining(TrainerCallback):
    """The mistake cadre/tuning/finetune.py guards against: a no-grad forward on the model being trained."""

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step == 1:
            model.eval()
            with torch.no_grad():
                model(**processing_class(["Phrase: disease"], return_tensors="pt"))
            model.train()


class LoraGradients(TrainerCallback):
    """Records, at each optimizer step, the smallest gradient norm over the LoRA B matrices (0 for a missing one)."""

    def __init__(self) -> None:
        self.smallest: dict[int, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norms = [
            0.0 if p.grad is None else float(p.grad.norm())
            for name, p in model.named_parameters()
            if p.requires_grad and "lora_B" in name
        ]
        self.smallest[state.global_step + 1] = min(norms)


def test_lora_trains_two_steps_with_finite_loss_and_streamed_metrics(tiny_model, data, tmp_path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    said: list[str] = []
    result = train(
        data,
        tiny_model,
        tmp_path / "run",
        tuning(),
        sink=lambda metrics, step: logged.append((step, metrics)),
        say=said.append,
    )
    assert result.global_step == 2 and result.resumed_from_step == 0 and not result.reused
    assert math.isfinite(result.train_loss) and math.isfinite(result.heldout_loss)
    assert [row["step"] for row in result.loss_curve] == [1.0, 2.0]
    assert all(math.isfinite(row["loss"]) and row["tokens_per_s"] > 0 for row in result.loss_curve)
    assert [step for step, metrics in logged if "loss" in metrics] == [1, 2]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(logged[0][1])
    assert any("steps to go" in line for line in said)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in result.adapter_dir.iterdir()}
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # finished: checkpoints cleaned up
    assert result.device == "cpu" and result.precision == "fp32"


def test_training_lowers_the_loss(tiny_model, data, tmp_path) -> None:
    result = train(data, tiny_model, tmp_path / "run", tuning(max_steps=12, checkpoint_every=100))
    losses = [row["loss"] for row in result.loss_curve]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_time_estimate_is_printed_after_the_first_steps(tiny_model, data, tmp_path) -> None:
    said: list[str] = []
    logged: list[dict[str, float]] = []
    train(
        data,
        tiny_model,
        tmp_path / "run",
        tuning(max_steps=5, checkpoint_every=100),
        say=said.append,
        sink=lambda m, s: logged.append(m),
    )
    estimate = [line for line in said if line.startswith("time estimate:")]
    assert len(estimate) == 1 and "s/step measured × 2 steps left" in estimate[0]
    assert any("estimated_seconds_left" in metrics for metrics in logged)


def test_the_estimate_of_time_left_updates_as_training_goes(tiny_model, data, tmp_path) -> None:
    """`train/estimated_seconds_left` is not frozen at its first value: it is logged again and ends at 0."""
    logged: list[tuple[int, float]] = []
    train(
        data,
        tiny_model,
        tmp_path / "run",
        tuning(max_steps=8, checkpoint_every=100),
        sink=lambda m, s: logged.append((s, m["estimated_seconds_left"])) if "estimated_seconds_left" in m else None,
    )
    steps = [step for step, _ in logged]
    left = [value for _, value in logged]
    assert len(logged) >= 2 and steps == sorted(steps) and steps[-1] == 8
    assert left[-1] == 0.0 and left[0] > 0.0


def test_qlora_trains_in_4_bit_on_cpu(tiny_model, data, tmp_path) -> None:
    result = train(data, tiny_model, tmp_path / "run", tuning(method="qlora"))
    assert result.method == "qlora" and result.global_step == 2 and math.isfinite(result.train_loss)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_where_an_unbroken_one_does(
    tiny_model, data, tmp_path
) -> None:
    settings = tuning(max_steps=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(data, tiny_model, tmp_path / "killed", settings, extra_callbacks=[KillAfterCheckpoint(2)])
    assert last_complete_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    said: list[str] = []
    resumed = train(data, tiny_model, tmp_path / "killed", settings, say=said.append)
    assert resumed.resumed_from_step == 2 and resumed.global_step == 4
    assert any("resuming from checkpoint-2" in line for line in said)
    assert [row["step"] for row in resumed.loss_curve] == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]  # history carried over from the checkpoint

    unbroken = train(data, tiny_model, tmp_path / "unbroken", settings)
    for name, weight in load_file(unbroken.adapter_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(
            load_file(resumed.adapter_dir / "adapter_model.safetensors")[name], weight, rtol=1e-4, atol=1e-5
        )


def test_a_half_written_checkpoint_is_ignored_and_removed(tmp_path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # killed while saving: no trainer state yet
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_text("partial")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_a_finished_training_is_reused_not_repeated(tiny_model, data, tmp_path) -> None:
    first = train(data, tiny_model, tmp_path / "run", tuning())
    said: list[str] = []
    again = train(data, tiny_model, tmp_path / "run", tuning(), say=said.append)
    assert again.reused and again.global_step == first.global_step and again.adapter_dir == first.adapter_dir
    assert again.loss_curve == first.loss_curve
    assert "reusing the adapter" in said[0]


def test_evaluating_the_4_bit_model_while_training_stops_the_run(
    tiny_model, data, tmp_path, four_bit_trap, record_property
) -> None:
    say_which_case(four_bit_trap, record_property)
    if four_bit_trap:
        with pytest.raises(SilentGradientLossError, match="no-grad forward"):
            train(
                data,
                tiny_model,
                tmp_path / "run",
                tuning(method="qlora", max_steps=3, checkpoint_every=100),
                extra_callbacks=[EvaluateWhileTraining()],
            )
        return
    # No trap here: the evaluation after step 1 must change nothing. The guard stays quiet, every later step
    # still gets LoRA gradients, the loss falls, and the adapter is the one an undisturbed run trains.
    settings = tuning(method="qlora", max_steps=8, checkpoint_every=100)
    gradients = LoraGradients()
    evaluated = train(
        data, tiny_model, tmp_path / "evaluated", settings, extra_callbacks=[EvaluateWhileTraining(), gradients]
    )
    assert evaluated.global_step == 8
    assert sorted(gradients.smallest) == list(range(1, 9))
    assert all(math.isfinite(norm) and norm > 0 for norm in gradients.smallest.values()), gradients.smallest
    losses = [row["loss"] for row in evaluated.loss_curve]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    undisturbed = train(data, tiny_model, tmp_path / "undisturbed", settings)
    trained = load_file(evaluated.adapter_dir / "adapter_model.safetensors")
    for name, weight in load_file(undisturbed.adapter_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-6)


def test_cpu_loss_scores_only_completions_and_matches_trls_loss_and_gradients(tiny_model, data, tmp_path) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    hardware = detect_hardware("cpu")
    torch.manual_seed(0)
    model, tokenizer = load_model(
        tiny_model, tuning(dropout=0.0), hardware
    )  # no dropout: both losses see the same network
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the gradient comparison
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    trainer_type = trainer_class(hardware, model)
    assert trainer_type is not SFTTrainer and issubclass(trainer_type, SFTTrainer)
    trainer = trainer_type(
        model=model,
        args=sft_config(tuning(), hardware, tmp_path, 2),
        train_dataset=Dataset.from_dict(data.columns()),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(trainer, model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, our_grads = loss_and_grads(trainer_type.compute_loss)
    theirs, their_grads = loss_and_grads(SFTTrainer.compute_loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_guard_refuses_a_repacked_model_and_missing_lora_gradients(tiny_model, four_bit_trap, record_property) -> None:
    say_which_case(four_bit_trap, record_property)
    step = type("State", (), {"global_step": 0})()
    model, tokenizer = load_model(tiny_model, tuning(method="qlora"), detect_hardware("cpu"))
    assert four_bit_layers(model)
    guard = FourBitGuard()
    guard.on_train_begin(None, None, None, model=model)  # freshly loaded: fine
    with pytest.raises(SilentGradientLossError, match="no gradient"):
        guard.on_pre_optimizer_step(None, step, None, model=model)  # no backward ran
    model.eval()
    with torch.no_grad():
        model(**tokenizer(["Phrase: disease"], return_tensors="pt"))
    if four_bit_trap:
        assert repacked_layers(model) > 0
        with pytest.raises(SilentGradientLossError, match="repacked"):
            FourBitGuard().on_train_begin(None, None, None, model=model)
    else:
        # Nothing was repacked, so the guard lets training start and a real step reaches every LoRA B matrix.
        assert repacked_layers(model) == 0
        guard = FourBitGuard()
        guard.on_train_begin(None, None, None, model=model)
        model.train()
        with torch.no_grad():  # LoRA B starts at zero; its gradient does not depend on it
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
        batch = tokenizer(["Phrase: disease number 3\nCode: I03.3"], return_tensors="pt")
        model(**batch, labels=batch["input_ids"]).loss.backward()
        guard.on_pre_optimizer_step(None, step, None, model=model)
        guard.on_step_end(None, step, None)

    # The layout check itself, on every CPU: one layer in bitsandbytes' CPU inference layout, made by the
    # converter its no-grad forward calls on CPUs with the trap.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model, _ = load_model(tiny_model, tuning(method="qlora"), detect_hardware("cpu"))
    layer = next(m for m in four_bit_layers(model) if m.weight.quant_state.shape[0] % 32 == 0)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    with pytest.raises(SilentGradientLossError, match="4-bit layers are in bitsandbytes. CPU inference layout"):
        FourBitGuard().on_train_begin(None, None, None, model=model)


class SigtermMidStep(TrainerCallback):
    """Sends this process SIGTERM from another thread a moment after step `step` begins, as `cadre down` would."""

    def __init__(self, step: int):
        self.step = step
        self.sent: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and self.sent is None:
            self.sent = 0.0

            def send() -> None:
                time.sleep(0.005)
                self.sent = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)

            threading.Thread(target=send, daemon=True).start()


def test_sigterm_stops_a_training_loop_within_a_step(tiny_model, data, tmp_path) -> None:
    """`cadre down` and a cancel send SIGTERM; trl's loop must stop at once (the handler runs between the native
    calls of a step), and unwind through `finally` blocks rather than die or train on."""
    stopper = SigtermMidStep(3)
    steps: list[int] = []
    with pytest.raises(Terminated, match="SIGTERM"), terminate_on_sigterm():
        try:
            train(
                data,
                tiny_model,
                tmp_path / "run",
                tuning(max_steps=200, checkpoint_every=1000),
                extra_callbacks=[stopper],
                sink=lambda metrics, step: steps.append(step) if "loss" in metrics else None,
            )
        finally:
            stopped = time.monotonic() - (stopper.sent or math.inf)
    assert stopped < 1.0, f"training went on for {stopped:.2f} s after SIGTERM"
    assert max(steps) <= 3, steps
    print(f"SIGTERM during step 3: training stopped {stopped * 1000:.0f} ms later, after step {max(steps)}")


def test_checkpoints_are_keyed_by_specialist_data_and_training_config(tmp_path) -> None:
    base = training_config_hash(tuning(), "tiny@1", 30)
    assert training_config_hash(tuning(checkpoint_every=5), "tiny@1", 30) == base  # how often it saves changes nothing
    assert training_config_hash(tuning(rank=8), "tiny@1", 30) != base
    assert training_config_hash(tuning(), "tiny@2", 30) != base
    assert training_config_hash(tuning(), "tiny@1", 300) != base
    folder = work_dir(tmp_path, "icd10-coder", "f" * 64, base)
    assert folder == tmp_path / "training" / "icd10-coder" / f"{'f' * 16}-{base[:16]}"


def test_budget_decides_the_steps() -> None:
    assert effective_steps(tuning(max_steps=300), "full", 20) == 300
    assert effective_steps(tuning(max_steps=300), "smoke", 20) == 20
    assert effective_steps(tuning(max_steps=10), "smoke", 20) == 10
    assert effective_steps(TuningSettings(max_steps=None, epochs=2), "full", 20) is None
    with pytest.raises(ValueError, match="budget"):
        effective_steps(tuning(), "huge", 20)


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_gguf_converter_is_found_where_setup_installs_it_or_named_in_the_error(tmp_path, monkeypatch) -> None:
    import tarfile

    from cadre.tuning.adapter_export import (
        SETUP_COMMAND,
        ConverterMissingError,
        find_converter,
        install_converter,
    )

    monkeypatch.delenv("CADRE_LLAMA_CPP_DIR", raising=False)
    monkeypatch.setattr("cadre.tuning.adapter_export.installed_converter_dir", lambda: tmp_path / "venv-share")
    with pytest.raises(ConverterMissingError) as missing:
        find_converter(tmp_path / "state")
    assert SETUP_COMMAND in str(missing.value) and str(tmp_path / "state" / "vendor" / "llama.cpp") in str(
        missing.value
    )

    # An sdist shaped like llama-cpp-python's: only the conversion pieces are extracted.
    source = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    for name in (
        "convert_lora_to_gguf.py",
        "convert_hf_to_gguf.py",
        "conversion/__init__.py",
        "gguf-py/gguf/__init__.py",
        "ggml/big.c",
    ):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("# stub\n")
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    installed = install_converter(sdist, tmp_path / "state" / "vendor" / "llama.cpp")
    assert find_converter(tmp_path / "state") == installed / "convert_lora_to_gguf.py"
    assert not (installed / "ggml").exists()
    assert find_converter(tmp_path / "state", "convert_hf_to_gguf.py").exists()
    monkeypatch.setenv("CADRE_LLAMA_CPP_DIR", str(installed))
    assert find_converter(tmp_path / "elsewhere") == installed / "convert_lora_to_gguf.py"
