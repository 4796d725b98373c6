"""Benchmark: retrieval alone against the declared program answering free, constrained and scored (issue #13).

On the first N cases of a split of a specialist's suite, against its live index, scores on the same cases:

- retrieval only: the first hit's id as the answer;
- the declared (zero-shot) program with each answer mode: `free` (the model writes any code), `constrained`
  (llama.cpp grammar over the retrieved ids), `score` (each candidate's log-likelihood; the best is answered).

For each: exact match and the other answer metrics with bootstrap intervals, the paired difference against
retrieval only, the share of answers that are not among the retrieved ids, and seconds per case. The LM is the
packaged GGUF in this process (`LlamaCppClient`, the one that runs adapters), so every mode runs on the same model.

Run (needs a live index: `cadre run reindex -s icd10-coder` first):

    OMP_NUM_THREADS=1 .venv/bin/python bench/answers.py --split test --cases 100 [--k 5] [--passage id,title]
        [--config other/pipelines.yaml] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cadre.config import load_config
from cadre.evaluation.comparison import outside_candidates
from cadre.evaluation.results import compare, load_cases
from cadre.prompts.optimize import evaluate_program, evaluate_retrieval_only
from cadre.prompts.program import CompletionLM, SpecialistProgram, open_retriever, use_disk_cache
from cadre.runtime.base_model import ensure_gguf
from cadre.runtime.lm import LlamaCppClient, llama_cpp_identity
from cadre.runtime.retrieval import IndexTarget

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "pipelines.yaml"), help="the pipelines file")
    parser.add_argument("--specialist", default="icd10-coder")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--k", type=int, default=None, help="passages per question (default: the program's)")
    parser.add_argument("--passage", default=None, help="passage fields, e.g. id,title,text (default: the program's)")
    parser.add_argument("--text-words", type=int, default=32)
    parser.add_argument("--modes", default="free,constrained,score")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    config = load_config(args.config)
    settings = config.specialist(args.specialist)
    program = settings.program
    update: dict = {}
    if args.k:
        update["retrieve_k"] = args.k
    if args.passage:
        update["passage"] = program.passage.model_copy(
            update={"fields": args.passage.split(","), "max_text_words": args.text_words}
        )
    program = program.model_copy(update=update)
    evaluation = settings.evaluation
    cases = load_cases(config.resolve(evaluation.suite), args.split, args.cases, required=program.field_names)
    use_disk_cache(config.state_dir / "cache" / "bench-answers")
    target = IndexTarget.from_config(config, args.specialist)
    retriever = open_retriever(target)
    gguf = ensure_gguf(config)
    client = LlamaCppClient(gguf, n_threads=config.project.lm.n_threads, n_ctx=config.project.lm.n_ctx)
    identity = llama_cpp_identity(gguf)

    print(
        f"{args.specialist}: {len(cases)} {args.split} cases, index {target.version}, k={program.retrieve_k}, "
        f"passage {','.join(program.passage.fields)}"
    )
    reference = evaluate_retrieval_only(retriever, program, evaluation, cases)
    runs = {"retrieval only": reference}
    for mode in args.modes.split(","):
        declared = program.model_copy(update={"answer": program.answer.model_copy(update={"mode": mode})})
        lm = CompletionLM(client, model_id=identity, max_tokens=declared.max_tokens)
        started = time.perf_counter()
        runs[mode] = evaluate_program(
            SpecialistProgram(declared, retriever), declared, evaluation, lm, cases, f"declared-{mode}"
        )
        print(
            f"  {mode}: {time.perf_counter() - started:.0f} s ({lm.usage.calls} LM calls, {lm.usage.cache_hits} cached)"
        )

    metric = evaluation.answer_metrics[0]
    rows = []
    header = f"| system | {metric} [95% CI] | Δ vs retrieval [95% CI, paired] | not among candidates | s/case |"
    print("\n" + header + "\n|---|---|---|---|---|")
    for name, run in runs.items():
        result = run.result
        low, high = result.intervals[metric]
        delta = "—"
        row = {"system": name, metric: result.scores[metric], "interval": [low, high]}
        if name != "retrieval only":
            versus = compare(result, reference.result, [metric], samples=evaluation.bootstrap_samples).metrics[metric]
            delta = f"{versus.delta:+.3f} [{versus.interval[0]:+.3f}, {versus.interval[1]:+.3f}]"
            row |= {"delta": versus.delta, "delta_interval": list(versus.interval)}
        outside = outside_candidates(result) if name != "retrieval only" else 0.0
        per_case = run.wall_seconds / max(len(cases), 1)
        row |= {"outside_candidates": outside, "seconds_per_case": per_case, "scores": result.scores}
        rows.append(row)
        print(
            f"| {name} | {result.scores[metric]:.3f} [{low:.3f}, {high:.3f}] | {delta} | {outside:.3f} | {per_case:.2f} |"
        )
    recall = {k: v for k, v in reference.result.scores.items() if k.startswith("recall@")}
    print("\nretrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "retrieval": recall}, indent=1))


if __name__ == "__main__":
    main()
