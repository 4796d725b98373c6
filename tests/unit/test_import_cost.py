"""Importing a flow module or the CLI must not import the training and embedding libraries.

`cadre deploy` imports every flow module, and the Prefect worker imports a flow's module for every run it
starts. transformers, peft, bitsandbytes and torch at module level cost ~30 s of that on a loaded 2-core
machine, so the modules that use them import them inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import flows

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("torch", "transformers", "trl", "peft", "sentence_transformers", "bitsandbytes")

CHEAP_MODULES = (
    *(f"flows.{module.name}" for module in pkgutil.iter_modules(flows.__path__)),
    "cadre.orchestration.deployments",
    "cadre.cli",
)

# Run in a fresh interpreter: records, for each heavy library, the line of the project's code whose import
# first pulled it in.
PROBE = """
import json, sys, traceback

heavy, root, modules = sys.argv[1].split(","), sys.argv[2], sys.argv[3].split(",")
first = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in heavy and name not in first:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(root) and "/.venv/" not in f.filename]
            first[name] = f"{ours[-1].filename.removeprefix(root)}:{ours[-1].lineno}: {ours[-1].line}" if ours else "?"
        return None


sys.meta_path.insert(0, Watch())
for module in modules:
    __import__(module)
print(json.dumps(first))
"""


def test_flows_and_cli_import_no_training_library(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(HEAVY), f"{ROOT}/", ",".join(CHEAP_MODULES)],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DSPY_CACHEDIR": str(tmp_path / "dspy")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == {}, (
        "importing "
        + ", ".join(CHEAP_MODULES)
        + " imported "
        + "; ".join(f"{name} (first by {where})" for name, where in sorted(imported.items()))
        + '. Import it inside the function that needs it; `python -X importtime -c "import flows.X"` shows the chain.'
    )
