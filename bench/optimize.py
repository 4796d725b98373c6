"""What Cadre's prompt compile costs over a bare DSPy script doing the same compile, side by side, one run.

Both sides run BootstrapFewShotWithRandomSearch with the same settings on the same train/dev cases,
the same retrieval (the specialist's live index) and the same LM server, each with a cold cache:

- flow: the `compile-program` task of the optimize-prompts flow, inside a Prefect flow run (ephemeral
  API), with Cadre's LM (cache, counters, budget) and the dev-evaluation tracker;
- bare: a plain `dspy.Module` that retrieves and predicts, the minimal `dspy.BaseLM` that posts the
  prompt to /v1/completions (no cache, no budget, no counters), and the same optimizer; it has no
  budget, so the flow's budget is set out of reach. Both use the completion adapter: without it the
  base model's answers cannot be parsed at all (a base model, not instruction-tuned), so there would be no compile to compare.

The flow learns only from *grounded* train cases (a relevant document among the retrieved passages;
`cadre.prompts.optimize.grounded_train_examples`), the bare script from every train case as a plain script
would: that filter is part of what is measured (fewer bootstrap calls that cannot succeed, and no
demo whose answer its candidates do not contain). The table says how many train cases each side used.

Run: `.venv/bin/python bench/optimize.py [-c pipelines.yaml] [-s icd10-coder] [--train 16 --dev 12
--candidates 2]` with the LM server up (`cadre up`) and the specialist's index live (re-index flow).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadre.config import load_config
from cadre.platform.env import apply_env

console = Console(width=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "pipelines.yaml"))
    parser.add_argument("-s", "--specialist", default="icd10-coder")
    parser.add_argument("--train", type=int, default=16, help="train cases")
    parser.add_argument("--dev", type=int, default=12, help="dev cases")
    parser.add_argument("--candidates", type=int, default=2, help="num_candidate_programs of the random search")
    args = parser.parse_args()

    config = load_config(args.config)
    apply_env(config)
    _use_ephemeral_prefect_unless_up(config.project.prefect.api)
    specialist = config.specialist(args.specialist)
    optimizer = specialist.program.optimizer.model_copy(
        update={
            "kind": "bootstrap_random_search",
            "num_candidate_programs": args.candidates,
            "max_lm_calls": 10_000,
            "max_wall_seconds": 86_400,
        }
    )
    program = specialist.program.model_copy(update={"optimizer": optimizer})
    from cadre.evaluation.results import load_cases

    suite = config.resolve(specialist.evaluation.suite)
    train, dev = load_cases(suite, "train", args.train), load_cases(suite, "dev", args.dev)
    scratch = Path(tempfile.mkdtemp(prefix="cadre-bench-optimize-"))
    try:
        flow_side = run_flow_compile(config, args.specialist, program, specialist.evaluation, train, dev, scratch)
        bare_side = run_bare_compile(config, args.specialist, program, specialist.evaluation, train, dev)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(flow_side, bare_side, args)


def _use_ephemeral_prefect_unless_up(api: str) -> None:
    """Use the project's Prefect server when it runs (`cadre up`), else Prefect's ephemeral API."""
    import os
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api}/health", timeout=3):
            return
    except OSError:
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.setdefault(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"
        )  # a busy 2-core box needs more than 20 s
        console.print(f"no Prefect server at {api}: using Prefect's ephemeral API")


def run_flow_compile(config, specialist: str, program, evaluation, train, dev, scratch: Path) -> dict:
    """The flow's compile task inside a Prefect flow run, with a fresh DSPy cache."""
    from prefect import flow

    from cadre.prompts.candidate import ProgramRuntime
    from cadre.prompts.optimize import OptimizationPlan
    from cadre.prompts.program import IndexTarget, lm_target
    from tasks.prompts import compile_candidate

    runtime = ProgramRuntime(
        lm_target(config), IndexTarget.from_config(config, specialist), str(scratch / "dspy-cache")
    )
    plan = OptimizationPlan(
        "bench", len(train), len(dev), None, program.optimizer.max_lm_calls, float(program.optimizer.max_wall_seconds)
    )

    @flow(name="bench-optimize-compile")
    def compile_flow():
        return compile_candidate(program, evaluation, runtime, train, dev, plan, str(scratch))

    console.print("[bold]flow[/bold]: compile-program task in a Prefect flow run …")
    started = time.perf_counter()
    candidate = compile_flow()
    wall = time.perf_counter() - started
    summary = candidate.summary
    return {
        "wall_s": wall,
        "compile_s": summary["compile_wall_seconds"],
        "lm_calls": int(summary["compile_lm_calls"]),
        "cache_hits": int(summary["compile_lm_cache_hits"]),
        "tokens": int(summary["compile_tokens"]),
        "dev_score": summary["compile_dev_score"],
        "demos": _demos(candidate.path),
        "train_used": int(summary["compile_train_examples"]),
    }


def run_bare_compile(config, specialist: str, program, evaluation, train, dev) -> dict:
    """The same compile as a plain DSPy script: stock LM, stock optimizer, no cache, no Prefect."""
    import dspy

    from cadre.evaluation import metrics
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.index import open_backend
    from cadre.knowledge.reindex import IndexSearcher, live_version
    from cadre.prompts.program import CompletionAdapter, make_signature
    from cadre.runtime.retrieval import search_passages

    settings = config.specialist(specialist)
    embedder = Embedder.load(config.project.embedding, config.project.threads, root=config.root)
    index = IndexSearcher(
        specialist,
        config.state_dir,
        open_backend(config.project.index, config.state_dir, specialist, dimension=embedder.dimension),
        embedder,
        settings.index.search_mode,
    )
    output = program.outputs[0].name
    live = live_version(config.state_dir, specialist)

    def passages(query: str) -> list[str]:
        # The runtime's search rule, so both compiles see the same candidates.
        return [passage.render() for passage in search_passages(index, query, program.retrieve_k, live)]

    class Bare(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict(make_signature(program))

        def forward(self, phrase):
            return self.answer(context=passages(phrase), phrase=phrase)

    def metric(example, prediction, trace=None):
        return metrics.compute(evaluation.answer_metrics[0], [prediction.get(output)], [example.get(output)])[0]

    lm = bare_completion_lm(config.project.lm.base_url, config.project.lm.model, program.max_tokens)
    dspy.configure(lm=lm, adapter=CompletionAdapter(program.context_field))

    def to_example(case: dict) -> dspy.Example:
        # Train examples carry their retrieved passages, so a labeled demo shows the candidates (as the flow's do).
        return dspy.Example(phrase=case["phrase"], code=case["code"], context=passages(case["phrase"])).with_inputs(
            "phrase"
        )

    optimizer = program.optimizer
    search = dspy.BootstrapFewShotWithRandomSearch(
        metric=metric,
        max_bootstrapped_demos=optimizer.max_bootstrapped_demos,
        max_labeled_demos=optimizer.max_labeled_demos,
        num_candidate_programs=optimizer.num_candidate_programs,
        num_threads=1,
    )
    console.print("[bold]bare[/bold]: the same compile as a plain DSPy script …")
    started = time.perf_counter()
    compiled = search.compile(Bare(), trainset=[to_example(c) for c in train], valset=[to_example(c) for c in dev])
    wall = time.perf_counter() - started
    best = max((c["score"] for c in compiled.candidate_programs), default=None)
    usage = [entry.get("usage") or {} for entry in lm.history]
    return {
        "wall_s": wall,
        "compile_s": wall,
        "lm_calls": len(lm.history),
        "cache_hits": 0,
        "tokens": sum(int(u.get("total_tokens") or 0) for u in usage),
        "dev_score": best,
        "demos": len(compiled.answer.demos),
        "train_used": len(train),
    }


def bare_completion_lm(base_url: str, model: str, max_tokens: int):
    """The minimal LM a DSPy user writes for a base model behind /v1/completions: no cache, no budget, no counters.

    Stock `dspy.LM(model_type="text")` cannot stand in: it appends "BEGIN RESPONSE:" to every prompt
    (dspy/clients/lm.py, `litellm_text_completion`), which is not the prompt the specialist is trained on.
    """
    import dspy
    import httpx

    class _Bare(dspy.BaseLM):
        def __init__(self):
            super().__init__(
                model=f"bare/{model}", model_type="text", max_tokens=max_tokens, temperature=0.0, cache=False
            )
            self._http = httpx.Client(timeout=120)

        def forward(self, prompt=None, messages=None, **kwargs):
            options = {**self.kwargs, **kwargs}
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": options["max_tokens"],
                "stop": options.get("stop") or [],
                "temperature": options.get("temperature") or 0.0,
            }
            data = self._http.post(f"{base_url.rstrip('/')}/completions", json=body).json()
            return {
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": data["choices"][0]["text"]}}],
                "usage": data.get("usage") or {},
            }

    return _Bare()


def _demos(path: str) -> int:
    import json

    return len(json.loads(Path(path).read_text())["answer"]["demos"])


def report(flow_side: dict, bare_side: dict, args) -> None:
    table = Table(
        title=f"Compile: BootstrapFewShotWithRandomSearch, {args.candidates} candidates, {args.train} train / {args.dev} dev cases "
        "(one run, cold caches)"
    )
    table.add_column("measure")
    table.add_column("Cadre flow (Prefect task)", justify="right")
    table.add_column("bare DSPy script", justify="right")
    table.add_column("flow ÷ bare", justify="right")
    rows = [
        ("wall time, whole run (s)", "wall_s", "{:.1f}"),
        ("wall time, compile only (s)", "compile_s", "{:.1f}"),
        ("LM calls", "lm_calls", "{:d}"),
        ("cache hits", "cache_hits", "{:d}"),
        ("tokens", "tokens", "{:d}"),
        ("best dev score (%)", "dev_score", "{:.1f}"),
        ("demos in the result", "demos", "{:d}"),
        ("train cases learned from", "train_used", "{:d}"),
    ]
    for label, key, shape in rows:
        ours, theirs = flow_side.get(key), bare_side.get(key)
        ratio = (
            f"{ours / theirs:.2f}"
            if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs
            else "—"
        )
        table.add_row(
            label,
            shape.format(ours) if ours is not None else "—",
            shape.format(theirs) if theirs is not None else "—",
            ratio,
        )
    console.print(table)


if __name__ == "__main__":
    main()
