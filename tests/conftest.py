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
