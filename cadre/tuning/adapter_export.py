"""LoRA adapters as artifacts: the PEFT adapter, and the same adapter in llama.cpp's GGUF form.

The refresh flow trains a PEFT adapter (`adapter_model.safetensors` + `adapter_config.json`) and the
specialist runs on llama.cpp over the GGUF base, so the adapter is converted with llama.cpp's own
`convert_lora_to_gguf.py` and then applied with `cadre.runtime.lm.LlamaCppClient(lora_path=...)`.

The converter is not in the llama-cpp-python wheel; it ships in its sdist (`vendor/llama.cpp/`, with
its `conversion/` package and `gguf-py`). `setup.sh` fetches the sdist once at install time and
extracts the converter into the virtualenv (`<venv>/share/cadre/llama.cpp`), where every project
that uses this installation finds it:

    python -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cadre/vendor
    python -m cadre.tuning.adapter_export install-converter .cadre/vendor/llama_cpp_python-0.3.36.tar.gz

A project may carry its own copy under `<state_dir>/vendor/llama.cpp` (`--target`), and
`CADRE_LLAMA_CPP_DIR` names any other folder. Nothing is downloaded at run time. `verify_gguf_adapter` checks that the converted adapter on the
GGUF base gives (nearly) the same greedy answers as the PEFT adapter on the fp32 base.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cadre.runtime.base_model import file_sha256

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
SETUP_COMMAND = (
    f"python -m pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} -d .cadre/vendor && "
    f"python -m cadre.tuning.adapter_export install-converter .cadre/vendor/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
)
CONVERTER_ENV = "CADRE_LLAMA_CPP_DIR"
GGUF_ADAPTER_NAME = "adapter.gguf"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


class ConverterMissingError(FileNotFoundError):
    """llama.cpp's converter has not been extracted under the state dir (an install-time step)."""


class ConversionError(RuntimeError):
    """The converter ran and failed; the message carries the end of its output."""


def installed_converter_dir() -> Path:
    """Where `install-converter` puts the converter by default: inside this Python environment."""
    return Path(sys.prefix) / "share" / "cadre" / "llama.cpp"


def converter_dirs(state_dir: Path) -> list[Path]:
    """Folders searched for the converter, in order: `$CADRE_LLAMA_CPP_DIR`, the project's state dir, the environment."""
    found = [Path(os.environ[CONVERTER_ENV])] if os.environ.get(CONVERTER_ENV) else []
    return [*found, Path(state_dir) / "vendor" / "llama.cpp", installed_converter_dir()]


def find_converter(state_dir: Path, script: str = "convert_lora_to_gguf.py") -> Path:
    """A llama.cpp conversion script (with its `conversion/` package beside it) from the first folder that has one.

    Raises:
        ConverterMissingError: it was never installed; the message lists where it looked and names the setup command.
    """
    for folder in converter_dirs(state_dir):
        if (folder / script).exists() and (folder / "conversion" / "__init__.py").exists():
            return folder / script
    searched = ", ".join(str(folder) for folder in converter_dirs(state_dir))
    raise ConverterMissingError(
        f"llama.cpp's {script} is not installed (looked in {searched}). It ships only in the llama-cpp-python sdist; "
        f"install it once (setup.sh does) with:\n  {SETUP_COMMAND}"
    )


def install_converter(sdist: Path, target: Path | None = None) -> Path:
    """Extract llama.cpp's conversion scripts from a llama-cpp-python sdist.

    Args:
        sdist: `llama_cpp_python-<version>.tar.gz` (from `pip download --no-binary :all:`).
        target: the folder to create (replaced if present); default `installed_converter_dir()`.

    Returns:
        The converter folder.
    """
    target = Path(target) if target is not None else installed_converter_dir()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist, "r:gz") as archive:
        root = archive.getnames()[0].split("/")[0]
        prefix = f"{root}/vendor/llama.cpp/"
        members = [
            m
            for m in archive.getmembers()
            if m.name.startswith(prefix)
            and any(
                m.name[len(prefix) :] == want or (want.endswith("/") and m.name[len(prefix) :].startswith(want))
                for want in CONVERTER_MEMBERS
            )
        ]
        if not any(m.name.endswith("convert_lora_to_gguf.py") for m in members):
            raise ConversionError(
                f"{sdist} holds no vendor/llama.cpp/convert_lora_to_gguf.py; is it the llama-cpp-python sdist?"
            )
        for member in members:
            member.name = member.name[len(prefix) :]
            archive.extract(member, partial, filter="data")
    (partial / "SOURCE.json").write_text(
        json.dumps({"sdist": Path(sdist).name, "sha256": file_sha256(Path(sdist))}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.replace(target)
    return target


@dataclass(frozen=True)
class ExportedAdapter:
    """An adapter ready to log, register and serve.

    Attributes:
        folder: holds the PEFT files and `adapter.gguf`.
        gguf: the llama.cpp LoRA adapter.
        sha256: digests of the files, by name.
        conversion_seconds: wall time of the GGUF conversion.
    """

    folder: Path
    gguf: Path
    sha256: dict[str, str]
    conversion_seconds: float

    @property
    def weights_sha256(self) -> str:
        """The trained weights' digest: the same adapter trained again on the same data has the same one."""
        return self.sha256[PEFT_FILES[0]]


def export_adapter(adapter_dir: Path, base_model_dir: Path, out_dir: Path, state_dir: Path) -> ExportedAdapter:
    """Copy the PEFT adapter into `out_dir` and add its llama.cpp GGUF conversion.

    Args:
        adapter_dir: the trained PEFT adapter.
        base_model_dir: the transformers base model it was trained on (only its config is read).
        out_dir: the export folder (replaced if it exists).
        state_dir: where the converter was installed.

    Raises:
        ConverterMissingError: the converter was never installed.
        ConversionError: the conversion failed.
    """
    script = find_converter(state_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in PEFT_FILES:
        shutil.copy2(Path(adapter_dir) / name, out_dir / name)
    started = time.perf_counter()
    gguf = convert_lora_to_gguf(out_dir, base_model_dir, out_dir / GGUF_ADAPTER_NAME, script)
    seconds = time.perf_counter() - started
    digests = {path.name: file_sha256(path) for path in sorted(out_dir.iterdir()) if path.is_file()}
    return ExportedAdapter(folder=out_dir, gguf=gguf, sha256=digests, conversion_seconds=seconds)


def random_adapter(
    base_model_dir: Path,
    out_dir: Path,
    state_dir: Path,
    seed: int,
    *,
    rank: int = 4,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    scale: float = 1.0,
) -> ExportedAdapter:
    """A random, non-zero LoRA adapter of the base model, exported like a trained one (PEFT files and GGUF).

    What the benchmarks and integration tests serve, register and swap when they need an adapter's real size and
    cost, not a trained one. The same seed gives the same adapter.

    Args:
        base_model_dir: the transformers base model.
        out_dir: the export folder (replaced if it exists); the PEFT adapter is saved beside it, in `<out_dir>.peft`.
        state_dir: where the converter was installed.
        seed: torch's seed for the weights.
        rank: the LoRA rank (alpha is twice it).
        target_modules: the adapted modules, as peft takes them (`"all-linear"`, or names).
        scale: multiplies the LoRA weights (small: answers stay readable text).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    if scale != 1.0:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.mul_(scale)
    peft_dir = out_dir.with_name(f"{out_dir.name}.peft")
    model.save_pretrained(peft_dir)
    del model
    return export_adapter(peft_dir, base_model_dir, out_dir, state_dir)


def convert_lora_to_gguf(
    adapter_dir: Path, base_model_dir: Path, out_path: Path, script: Path, outtype: str = "f32"
) -> Path:
    """Run llama.cpp's `convert_lora_to_gguf.py` on a PEFT adapter (offline: `--base` is a local folder)."""
    command = [
        sys.executable,
        str(script),
        "--base",
        str(base_model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(out_path),
        str(adapter_dir),
    ]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=_converter_env(), cwd=script.parent, timeout=600
    )
    if done.returncode != 0 or not out_path.exists():
        raise ConversionError(
            f"convert_lora_to_gguf.py exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    return out_path


def convert_model_to_gguf(model_dir: Path, out_path: Path, state_dir: Path, outtype: str = "f16") -> Path:
    """Convert a transformers model folder to GGUF once (a base model that is not the packaged one).

    The packaged Gemma 3 270M already has its GGUF (`cadre.runtime.base_model.ensure_gguf`); a user's own base
    model needs one so that llama.cpp can run it with an adapter. Reused while the file exists.
    """
    if out_path.exists():
        return out_path
    script = find_converter(state_dir, "convert_hf_to_gguf.py")
    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(script), "--outtype", outtype, "--outfile", str(partial), str(model_dir)]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=_converter_env(), cwd=script.parent, timeout=3600
    )
    if done.returncode != 0 or not partial.exists():
        raise ConversionError(
            f"convert_hf_to_gguf.py exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    partial.replace(out_path)
    return out_path


def _converter_env() -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"
    }  # use the gguf-py that matches the script
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgreementReport:
    """Greedy answers of the PEFT adapter (transformers, fp32 base) and the GGUF adapter (llama.cpp, GGUF base).

    Attributes:
        prompts: prompts compared.
        agreement: share of prompts whose answers are identical.
        pairs: (peft answer, gguf answer) per prompt.
    """

    prompts: int
    agreement: float
    pairs: list[tuple[str, str]]


def verify_gguf_adapter(
    peft_dir: Path,
    base_model_dir: Path,
    gguf_adapter: Path,
    base_gguf: Path,
    prompts: Sequence[str],
    *,
    max_tokens: int,
    stop: Sequence[str],
    threads: int = 1,
) -> AgreementReport:
    """Compare greedy answers of the two forms of an adapter on the same prompts.

    The bases differ slightly (fp32 dequantized from the GGUF vs. the Q4_K_M GGUF itself, with
    llama.cpp's own kernels), so answers may differ on a close call; a converter bug would make
    them differ on most prompts.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadre.runtime.lm import LlamaCppClient

    torch.set_num_threads(max(threads, 1))
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32), peft_dir
    ).eval()
    peft_answers = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False)
        peft_answers.append(
            _cut(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True), stop)
        )
    del model
    client = LlamaCppClient(base_gguf, lora_path=gguf_adapter, n_threads=threads)
    gguf_answers = [_cut(client.complete(p, max_tokens=max_tokens, stop=list(stop)).text, stop) for p in prompts]
    pairs = list(zip(peft_answers, gguf_answers, strict=True))
    same = sum(a.strip() == b.strip() for a, b in pairs)
    return AgreementReport(prompts=len(pairs), agreement=same / len(pairs) if pairs else 1.0, pairs=pairs)


def _cut(text: str, stop: Sequence[str]) -> str:
    for marker in stop:
        text = text.split(marker)[0]
    return text


def main(argv: list[str] | None = None) -> int:
    """`python -m cadre.tuning.adapter_export install-converter SDIST [--target DIR]` (run by setup.sh)."""
    parser = argparse.ArgumentParser(prog="python -m cadre.tuning.adapter_export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install-converter", help="extract llama.cpp's LoRA→GGUF converter from a llama-cpp-python sdist"
    )
    install.add_argument("sdist", type=Path)
    install.add_argument(
        "--target",
        type=Path,
        default=None,
        help=f"folder to extract into (default: {installed_converter_dir()}; a project's own: <state_dir>/vendor/llama.cpp)",
    )
    args = parser.parse_args(argv)
    target = install_converter(args.sdist, args.target)
    print(f"llama.cpp converter installed in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
