"""Benchmark of edge export: a specialist's bundle vs the served champion and the bare base GGUF, at 1 thread.

In one run, against the project's MLflow server (its registry names the champions; nothing else is started):

1. `export_bundle(champion_parts(...))` into a temporary folder: time, and size by part.
2. Cold start: `Bundle.open` + the first answer in a fresh process with no service address: seconds to open (verify
   every file, load the GGUF), seconds to the first answer (which loads the embedding model), peak RSS.
3. Parity on the first N test cases, as `cadre export` judges a bundle (`cadre.edge.judge.judge_bundle`): the server's
   runtime (`build_runtime`, as `cadre serve` builds it) and the bundle answer each case (after one untimed answer
   each: the first search loads the embedding model); identical results (answer, outputs, retrieved ids), the first
   answer metric of each with its 95 % interval, p50/p95 per answer.
4. The bare base GGUF in llama.cpp (`LlamaCppClient`, no adapter) completing the prompts the bundle rendered: p50/p95.
4b. When the champion scores its candidates (`answer.mode: score`): the bundle's prompts and candidates scored on its
   GGUF as before (the whole prompt evaluated for each answer, every candidate in full), with the prompt's fixed part
   kept (`evaluate_prompt`), and with every candidate given up once it cannot win (`score_continuations` with rank
   penalties) at retrieval weights 0, 1 and 100: p50/p95, forward passes per answer, and whether every answer is
   the same.
5. Query embedding with the bundle's embedding model, one fresh process per runtime (`Embedder.runtime`: `numpy`, what
   the bundle uses, and `torch`, sentence-transformers): seconds from start to the first query vector, p50/p95 per
   query after it, peak RSS, and how far apart the two runtimes' vectors are.

Run (the stack's MLflow up, e.g. `cadre up --only mlflow`):

    .venv/bin/python bench/edge.py -c pipelines.yaml -s icd10-coder [--cases 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadre.config import load_config
from cadre.platform.env import apply_env

console = Console(width=120)

COLD_START = """
import json, resource, sys, time
started = time.perf_counter()
from cadre.edge import Bundle
bundle = Bundle.open(sys.argv[1], n_threads=1)
opened = time.perf_counter() - started
bundle.answer(json.loads(sys.argv[2]))
first = time.perf_counter() - started
bundle.close()
print("RESULT " + json.dumps({"open_s": opened, "first_answer_s": first,
                              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

EMBED_COLD = """
import json, resource, sys, time
started = time.perf_counter()
import numpy as np
from cadre.config.project import EmbeddingSettings, ThreadSettings
from cadre.knowledge.embedding import Embedder
model_dir, runtime, queries, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
embedder = Embedder.load(EmbeddingSettings(model=model_dir, batch_size=1), ThreadSettings(embedding=1), runtime=runtime)
vectors = [embedder.embed_query(queries[0])]
first = time.perf_counter() - started
seconds = []
for query in queries[1:]:
    begun = time.perf_counter()
    vectors.append(embedder.embed_query(query))
    seconds.append(time.perf_counter() - begun)
np.save(out, np.stack(vectors))
print("RESULT " + json.dumps({"first_vector_s": first, "seconds": seconds, "heavy": "torch" in sys.modules,
                              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fresh_process(script: str, argv: list[str], env: dict[str, str], cwd: Path) -> dict | None:
    """Run `script` in a fresh interpreter; its `RESULT {json}` line, or None (its stderr printed) if it failed."""
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    if done.returncode != 0:
        console.print(done.stderr[-3000:])
        return None
    return json.loads(
        next(line for line in done.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(call, items):
    results, seconds = [], []
    for item in items:
        started = time.perf_counter()
        results.append(call(item))
        seconds.append(time.perf_counter() - started)
    return results, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="pipelines.yaml")
    parser.add_argument("-s", "--specialist", required=True)
    parser.add_argument("--cases", type=int, default=60, help="test cases for parity and latency (default: 60)")
    args = parser.parse_args()

    config = load_config(args.config)
    apply_env(config)
    config.specialist(args.specialist)  # an unknown name fails here, before anything is exported
    work = Path(tempfile.mkdtemp(prefix="cadre-edge-bench-"))
    try:
        return run(args, config, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the bundle is a few hundred MB


def run(args: argparse.Namespace, config, work: Path) -> int:
    from cadre.edge import Bundle, export_bundle
    from cadre.edge.export import champion_parts
    from cadre.edge.judge import judge_bundle
    from cadre.evaluation.results import load_cases
    from cadre.knowledge.embedding import EMBED_RUNTIMES
    from cadre.runtime.base_model import base_gguf
    from cadre.runtime.lm import LlamaCppClient
    from cadre.runtime.retrieval import retrieval_query

    settings = config.specialist(args.specialist)
    inputs = [f.name for f in settings.program.inputs]
    cases = load_cases(config.resolve(settings.evaluation.suite), "test")[: args.cases]
    started = time.perf_counter()
    folder = export_bundle(champion_parts(config, args.specialist), work / "bundle")
    export_s = time.perf_counter() - started
    manifest = json.loads((folder / "bundle.json").read_text())
    parts: dict[str, int] = {}
    for name, entry in manifest["files"].items():
        parts[name.split("/")[0]] = parts.get(name.split("/")[0], 0) + entry["bytes"]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | {"OMP_NUM_THREADS": "1"}
    first_case = {name: cases[0].get(name) for name in inputs}
    cold = fresh_process(COLD_START, [str(folder), json.dumps(first_case)], env, work)
    if cold is None:
        return 1
    embedding: dict[str, dict] = {}
    if manifest["index"]:
        texts = json.dumps([retrieval_query(case, inputs) for case in cases])
        for runtime in EMBED_RUNTIMES:
            argv = [str(folder / manifest["index"]["embedder"]), runtime, texts, str(work / f"vectors-{runtime}.npy")]
            found = fresh_process(EMBED_COLD, argv, env, work)
            if found is None:
                return 1
            embedding[runtime] = found

    judgement = judge_bundle(config, args.specialist, folder, cases=args.cases)

    queries = [{name: case.get(name) for name in inputs} for case in cases]
    bundle = Bundle.open(folder, n_threads=1)
    rendered = [bundle.render(q) for q in queries]
    prompts = [r.prompt for r in rendered]
    stop = bundle.runtime.spec.stop
    max_tokens = bundle.runtime.max_tokens
    scoring = bundle.runtime.answer_mode == "score"
    bundle.close()
    pruning = score_pruning(folder, manifest, rendered, stop) if scoring else []
    bare = LlamaCppClient(base_gguf(config, settings.base_model), n_threads=1, n_ctx=config.project.lm.n_ctx)
    bare.complete(prompts[0], max_tokens=max_tokens, stop=stop)
    _, bare_s = timed(lambda p: bare.complete(p, max_tokens=max_tokens, stop=stop), prompts)

    n = len(cases)
    lineage = manifest["lineage"]
    console.print(
        f"[bold]{args.specialist}[/bold]: program {lineage.get('program') or 'declared'}, adapter "
        f"{lineage.get('adapter') or 'none'}, index {lineage.get('index_version') or 'none'}; exported in {export_s:.1f} s"
    )
    console.print(
        "bundle size: "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(parts.items()))
        + f"; total {manifest['bytes'] / 1e6:.0f} MB"
    )
    console.print(
        f"cold start (fresh process, 1 thread): open {cold['open_s']:.2f} s, first answer {cold['first_answer_s']:.2f} s "
        f"after start, peak RSS {cold['rss_mb']:.0f} MB"
    )
    metric = judgement.metric

    def scored(result) -> str:
        low, high = result.intervals[metric]
        return f"{result.scores[metric]:.3f} [{low:.3f}, {high:.3f}]"

    console.print(
        f"parity on {judgement.cases} test cases: {judgement.identical}/{judgement.cases} identical results; {metric} "
        f"served {scored(judgement.served)}, bundle {scored(judgement.bundle)}"
    )
    table = Table("per answer, 1 thread", "p50 ms", "p95 ms")
    for name, result in (("served champion (cadre serve's runtime)", judgement.served), ("bundle", judgement.bundle)):
        table.add_row(name, f"{result.scores['latency_p50_ms']:.0f}", f"{result.scores['latency_p95_ms']:.0f}")
    table.add_row(
        "bare base GGUF, no adapter (free completion)",
        f"{statistics.median(bare_s) * 1000:.0f}",
        f"{percentile(bare_s, 0.95) * 1000:.0f}",
    )
    console.print(table)
    if embedding:
        table = Table(
            f"query embedding, {manifest['index']['embedder']}/, 1 thread",
            "first vector after start s",
            "p50 ms",
            "p95 ms",
            "peak RSS MB",
            "imports torch",
        )
        for runtime, found in embedding.items():
            seconds = found["seconds"]
            table.add_row(
                runtime,
                f"{found['first_vector_s']:.2f}",
                f"{statistics.median(seconds) * 1000:.1f}",
                f"{percentile(seconds, 0.95) * 1000:.1f}",
                f"{found['rss_mb']:.0f}",
                "yes" if found["heavy"] else "no",
            )
        console.print(table)
        vectors = {runtime: np.load(work / f"vectors-{runtime}.npy") for runtime in embedding}
        console.print(
            f"numpy vs torch vectors on {n} queries: max |difference| {np.abs(vectors['numpy'] - vectors['torch']).max():.1e}, "
            f"lowest cosine {(vectors['numpy'] * vectors['torch']).sum(axis=1).min():.7f}"
        )
    if pruning:
        table = Table(
            "scoring the candidates (prompt included), 1 thread",
            "p50 ms",
            "p95 ms",
            "llama.cpp evals",
            "ratio",
            "same answers",
            title="score_continuations as before vs. keeping the instruction and giving up candidates that cannot win",
        )
        for row in pruning:
            table.add_row(*row)
        console.print(table)
    for difference in judgement.differences:
        console.print(f"differs: {difference}")
    return 0


def score_pruning(folder: Path, manifest: dict, rendered: list, stop: list[str]) -> list[tuple]:
    """The bundle's prompts and candidates scored in full and with the candidates that cannot win given up, at
    retrieval weights 0, 1 and 100 (the same llama.cpp model; the answers must agree)."""
    from cadre.runtime.lm import LlamaCppClient, answer_continuation, forget_prompt, pick_scored, rank_penalties

    adapter = (manifest["model"].get("adapter") or {}).get("file")
    client = LlamaCppClient(
        folder / manifest["model"]["base"]["file"],
        lora_path=folder / adapter if adapter else None,
        n_threads=1,
        n_ctx=int(manifest["runtime"]["n_ctx"]),
    )
    passes = [0]
    real_eval = client._llama.eval

    def counted(tokens):
        passes[0] += 1
        return real_eval(tokens)

    client._llama.eval = counted
    work = [
        (r.prompt, [answer_continuation(c, stop) for c in dict.fromkeys(r.candidates)])
        for r in rendered
        if r.candidates
    ]
    client.score(*work[0])  # warm

    def measure(weight: float | None = None, keep: bool = True) -> tuple[list[float], float, list[list[float]]]:
        """Score every prompt's candidates: seconds each, llama.cpp evals per answer, the scores. `weight` None
        scores every candidate in full; `keep` False evaluates the whole prompt each time (as before)."""
        seconds, evals, scores = [], 0, []
        for prompt, continuations in work:
            if not keep:
                forget_prompt(client._llama)
            penalties = None if weight is None else rank_penalties(len(continuations), weight)
            passes[0] = 0
            started = time.perf_counter()
            scores.append(client.score(prompt, continuations, penalties))
            seconds.append(time.perf_counter() - started)
            evals += passes[0]
        return seconds, evals / len(work), scores

    def row(name: str, seconds: list[float], evals: float, same: str) -> tuple:
        return (name, *_latency(seconds), f"{evals:.1f}", f"{baseline / statistics.median(seconds):.2f}×", same)

    before_s, before_evals, before_scores = measure(keep=False)
    full_s, full_evals, full_scores = measure()
    baseline = statistics.median(before_s)
    same = sum(pick_scored(a) == pick_scored(b) for a, b in zip(before_scores, full_scores, strict=True))
    rows = [
        row("in full, whole prompt each time", before_s, before_evals, "—"),
        row("in full, instruction kept", full_s, full_evals, f"{same}/{len(work)} (weight 0)"),
    ]
    for weight in (0.0, 1.0, 100.0):
        seconds, evals, pruned = measure(weight)
        same = sum(pick_scored(p, weight) == pick_scored(f, weight) for p, f in zip(pruned, full_scores, strict=True))
        rows.append(
            row(f"kept, candidates given up when beaten, weight {weight:g}", seconds, evals, f"{same}/{len(work)}")
        )
    return rows


def _latency(seconds: list[float]) -> tuple[str, str]:
    return f"{statistics.median(seconds) * 1000:.0f}", f"{percentile(seconds, 0.95) * 1000:.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
