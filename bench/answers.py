"""Benchmark: the story table of a retrieving specialist: retrieval alone, then each way the LM answers (issue #13).

On the same N cases of a split of the specialist's suite, scores:

- retrieval only: the first hit's id as the answer, on each index version given (`--versions`, e.g. the one built
  with the packaged embedder and the one a refreshed embedder re-embedded; default: the live version);
- the declared (zero-shot) program on the last version, with each answer mode: `free` (the model writes any code),
  `constrained` (llama.cpp grammar over the retrieved ids), `score` (each candidate's log-likelihood), and `score`
  with the retriever's ranking weighted (`--weights`): the weight is chosen on `--choose-cases` dev cases, as the
  optimize flow chooses it, then scored on the split.

For each: exact match and the other answer metrics with bootstrap intervals, the paired difference against the first
row (retrieval only on the first version), the share of answers that are not among the retrieved ids, and seconds
per case. The LM is the packaged GGUF in this process (`LlamaCppClient`, the one that runs adapters; `--adapter` a
LoRA GGUF), so every mode runs on the same model.

Run (needs a live index: `cadre run reindex -s icd10-coder` first):

    OMP_NUM_THREADS=2 .venv/bin/python bench/answers.py --split test --cases 300 [--versions OLD,NEW] [--k 5]
        [--modes free,constrained,score] [--weights 0.5,1,2,100] [--choose-cases 150] [--adapter a.gguf]
        [--passage id,title] [--config other/pipelines.yaml] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from cadre.config import load_config
from cadre.evaluation.comparison import outside_candidates
from cadre.evaluation.results import compare, load_cases
from cadre.knowledge.reindex import live_version
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
    parser.add_argument("--versions", default=None, help="index versions, comma-separated (default: the live one)")
    parser.add_argument("--k", type=int, default=None, help="passages per question (default: the program's)")
    parser.add_argument("--passage", default=None, help="passage fields, e.g. id,title,text (default: the program's)")
    parser.add_argument("--text-words", type=int, default=32)
    parser.add_argument("--modes", default="free,constrained,score")
    parser.add_argument("--weights", default="", help="retrieval weights tried with score on dev, e.g. 0.5,1,2,100")
    parser.add_argument("--choose-cases", type=int, default=150, help="dev cases the weight is chosen on")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter in GGUF form applied to the base model")
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
    suite = config.resolve(evaluation.suite)
    cases = load_cases(suite, args.split, args.cases, required=program.field_names)
    versions = args.versions.split(",") if args.versions else [live_version(config.state_dir, args.specialist)]
    use_disk_cache(config.state_dir / "cache" / "bench-answers")
    target = IndexTarget.from_config(config, args.specialist, pin_live=False)
    retrievers = {v: open_retriever(replace(target, version=v)) for v in versions}
    gguf = ensure_gguf(config)
    client = LlamaCppClient(gguf, args.adapter, n_threads=2, n_ctx=config.project.lm.n_ctx)
    identity = llama_cpp_identity(gguf, args.adapter)
    lm = CompletionLM(client, model_id=identity, max_tokens=program.max_tokens)

    print(
        f"{args.specialist}: {len(cases)} {args.split} cases, index versions {', '.join(versions)}, "
        f"k={program.retrieve_k}, passage {','.join(program.passage.fields)}"
        + (f", adapter {args.adapter}" if args.adapter else "")
    )
    runs = {}
    for version, retriever in retrievers.items():
        runs[f"retrieval only ({version})"] = evaluate_retrieval_only(retriever, program, evaluation, cases)
    retriever = retrievers[versions[-1]]

    def answering(mode: str, weight: float = 0.0):
        answer = program.answer.model_copy(update={"mode": mode, "retrieval_weight": weight})
        return program.model_copy(update={"answer": answer})

    def timed(name: str, declared, on_cases) -> None:
        started, before = time.perf_counter(), lm.usage.snapshot()
        runs[name] = evaluate_program(SpecialistProgram(declared, retriever), declared, evaluation, lm, on_cases, name)
        used = lm.usage.since(before)
        print(f"  {name}: {time.perf_counter() - started:.0f} s ({used.calls} LM calls, {used.cache_hits} cached)")

    for mode in [m for m in args.modes.split(",") if m]:
        timed(f"declared, {mode}", answering(mode), cases)
    weights = [float(w) for w in args.weights.split(",") if w]
    if weights:
        metric = evaluation.answer_metrics[0]
        dev = load_cases(suite, "dev", args.choose_cases, required=program.field_names)
        on_dev = {}
        for weight in weights:
            declared = answering("score", weight)
            run = evaluate_program(SpecialistProgram(declared, retriever), declared, evaluation, lm, dev, "dev")
            on_dev[weight] = run.result.scores[metric]
        best = max(weights, key=lambda w: (on_dev[w], -weights.index(w)))
        print("  on dev: " + ", ".join(f"weight {w:g} {s:.3f}" for w, s in on_dev.items()) + f"; kept {best:g}")
        timed(f"declared, score, retrieval weight {best:g} (chosen on dev)", answering("score", best), cases)

    metric = evaluation.answer_metrics[0]
    reference_name = next(iter(runs))
    reference = runs[reference_name]
    rows = []
    header = f"| system | {metric} [95% CI] | Δ vs first row [95% CI, paired] | not among candidates | s/case |"
    print("\n" + header + "\n|---|---|---|---|---|")
    for name, run in runs.items():
        result = run.result
        low, high = result.intervals[metric]
        delta = "—"
        row = {"system": name, metric: result.scores[metric], "interval": [low, high]}
        if name != reference_name:
            versus = compare(result, reference.result, [metric], samples=evaluation.bootstrap_samples).metrics[metric]
            delta = f"{versus.delta:+.3f} [{versus.interval[0]:+.3f}, {versus.interval[1]:+.3f}]"
            row |= {"delta": versus.delta, "delta_interval": list(versus.interval)}
        ids = evaluation.retrieval_answer == "id"  # a text answer (a pronunciation) is never a retrieved id
        outside = outside_candidates(result) if ids and not name.startswith("retrieval only") else None
        per_case = run.wall_seconds / max(len(cases), 1)
        row |= {"outside_candidates": outside, "seconds_per_case": per_case, "scores": result.scores}
        rows.append(row)
        print(
            f"| {name} | {result.scores[metric]:.3f} [{low:.3f}, {high:.3f}] | {delta} | "
            f"{'—' if outside is None else f'{outside:.3f}'} | {per_case:.2f} |"
        )
    for name, run in runs.items():
        if name.startswith("retrieval only"):
            recall = {k: round(v, 3) for k, v in run.result.scores.items() if k.startswith("recall@") or k == "mrr"}
            print(f"{name}: {recall}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
