"""Benchmark of the retriever refresh (the `embedder` stage) on ICD-10-CM, the demo specialist.

Printed side by side, in one run:

1. training: the stage's `train_embedder` (checkpoints, resumable work folder, identity marker) against a bare
   sentence-transformers script (`SentenceTransformerTrainer` + `MultipleNegativesRankingLoss`, nothing else) on
   the same pairs and settings: wall time of each and the ratio bare / stage (target: >= 0.9);
2. with `--quality`: the full re-embed of the corpus with the fine-tuned model (wall time), and recall@1, recall@5,
   recall@10 and MRR on the test split (300 cases), champion (the live index of `--state-dir`) against the new
   model's index, with 95 % bootstrap intervals and the paired interval of the gain.

The pairs are built as the flow builds them: train cases, hard negatives mined from the live index of
`--state-dir` (the demo stack's `.cadre`, only read). What the bench builds goes to `--work-dir`.

Run from the repository root, with the demo's full index live:

    OMP_NUM_THREADS=2 .venv/bin/python bench/embedder.py --steps 4 --ratio-steps 4   # the training ratio, minutes
    OMP_NUM_THREADS=2 .venv/bin/python bench/embedder.py --quality                   # the full refresh's figures

`--max-documents N` builds a champion index of N documents (the suite's codes first) in the work folder instead
of reading `--state-dir`; `--steps` caps the training (and the pairs at steps x batch size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALIST = "icd10-coder"
METRICS = ["recall@1", "recall@5", "recall@10", "mrr"]


def bare_training(pairs, base_dir: Path, settings, steps: int, output: Path, threads: int) -> float:
    """What a user would write with sentence-transformers alone: same pairs, loss, sampler and settings."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers

    torch.set_num_threads(threads)
    columns = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    for index in range(len(pairs[0].negatives)):
        columns[f"negative_{index + 1}"] = [p.negatives[index] for p in pairs]
    model = SentenceTransformer(str(base_dir), device="cpu", local_files_only=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output / "bare-checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,
        seed=settings.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    started = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(columns),
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    model.save(str(output / "bare-model"))
    return time.perf_counter() - started


def evaluate(searcher, version: str, cases, input_names, name: str, settings):
    """Retrieval metrics of one index version on the cases, as the re-index gate computes them."""
    from cadre.evaluation.results import Prediction, evaluate_cases
    from cadre.runtime.retrieval import retrieval_query

    def predict(case):
        hits = searcher.search(retrieval_query(case, input_names), k=10, version=version)
        ranked = list(dict.fromkeys(hit.record_id for hit in hits))
        return Prediction(output=ranked[0] if ranked else None, retrieved_ids=ranked)

    return evaluate_cases(
        cases,
        predict,
        METRICS,
        name=name,
        output_field=None,
        retrieval_field="relevant_ids",
        confidence=settings.evaluation.confidence,
        bootstrap_samples=settings.evaluation.bootstrap_samples,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "pipelines.yaml")
    parser.add_argument("--state-dir", type=Path, default=None, help="the stack's state dir (default: the config's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to train and build (default: temporary)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: embedder.max_steps)")
    parser.add_argument("--quality", action="store_true", help="also re-embed the corpus and compare retrieval")
    parser.add_argument(
        "--ratio-steps", type=int, default=0, help="time the stage and a bare script on this many steps (0: skip)"
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="override embedder.learning_rate")
    parser.add_argument(
        "--max-documents", type=int, default=None, help="build a champion index of this many documents here instead"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    from cadre.config import load_config
    from cadre.evaluation.results import load_cases, paired_bootstrap_intervals
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.index import open_backend
    from cadre.knowledge.reindex import IndexSearcher, plan_and_apply, promote_version, suite_relevant_ids
    from cadre.tuning.embedder import (
        build_pairs,
        hit_text,
        indexed_texts,
        plan_embedder,
        train_embedder,
        usable_cases,
    )

    config = load_config(args.config)
    settings = config.specialist(SPECIALIST)
    if args.learning_rate:
        tuned = settings.embedder.model_copy(update={"learning_rate": args.learning_rate})
        settings = settings.model_copy(update={"embedder": tuned})
    state_dir = args.state_dir or config.state_dir
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-embedder-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = config.project.threads.torch
    plan = plan_embedder(settings, "full")
    if args.steps:
        plan = replace(plan, max_steps=args.steps, max_train_pairs=args.steps * settings.embedder.batch_size)
    source_names = [source.name for source in settings.sources]
    numbers: dict[str, float | str] = {"steps": plan.max_steps or 0}

    configured = Embedder.load(config.project.embedding, config.project.threads, root=config.root)
    suite = config.resolve(settings.evaluation.suite)
    if args.max_documents:
        # A corpus of its own: the test and train codes first, then classification order, up to the cap.
        state_dir = work / "champion-state"
        backend = open_backend(config.project.index, state_dir, SPECIALIST, dimension=configured.dimension)
        started = time.perf_counter()
        champion_build = plan_and_apply(
            SPECIALIST,
            settings.sources,
            settings.chunking,
            root=config.root,
            state_dir=state_dir,
            embedder=configured,
            backend=backend,
            max_documents=args.max_documents,
            show_progress=True,
            priority_ids=suite_relevant_ids(suite, ("test", "train")),
        )
        promote_version(state_dir, SPECIALIST, champion_build.version)
        numbers |= {"documents": champion_build.documents_total, "chunks": champion_build.chunks_total}
        numbers["seconds_champion_index"] = time.perf_counter() - started
        print(
            f"champion index: {champion_build.documents_total} documents, {champion_build.chunks_total} chunks "
            f"in {numbers['seconds_champion_index']:.0f} s"
        )
    backend = open_backend(config.project.index, state_dir, SPECIALIST, dimension=configured.dimension)
    searcher = IndexSearcher(SPECIALIST, state_dir, backend, configured, settings.index.search_mode)
    live = searcher.layout.pointers.get(SPECIALIST)
    if live is None:
        print(f"no live index of {SPECIALIST} under {state_dir}: run `cadre run reindex` first", file=sys.stderr)
        return 1
    held = set(searcher.layout.read_manifest(live).documents)
    champion = searcher.embedder_for(live)
    input_names = [f.name for f in settings.program.inputs]

    started = time.perf_counter()
    cases = [
        case
        for case in usable_cases(load_cases(suite, "train"), input_names)
        if any(f"{source}:{item}" in held for item in case["relevant_ids"] for source in source_names)
    ][: plan.max_train_pairs]
    texts = indexed_texts(config, SPECIALIST, {i for c in cases for i in c["relevant_ids"]}, champion, None)
    queries = [" ".join(str(c[n]) for n in input_names if c.get(n)) for c in cases]
    found = searcher.search_many(queries, settings.embedder.mine_depth, version=live)
    hits = [[(hit.record_id, hit_text(hit)) for hit in ranked] for ranked in found]
    pairs = build_pairs(cases, input_names, texts, hits, hard_negatives=settings.embedder.hard_negatives)
    numbers |= {"pairs": len(pairs), "seconds_pairs_and_mining": time.perf_counter() - started}
    print(f"{len(pairs)} pairs built and mined from {live} in {numbers['seconds_pairs_and_mining']:.0f} s")

    started = time.perf_counter()
    trained = train_embedder(pairs, champion.model_dir, settings.embedder, plan, work / "stage", threads=threads)
    numbers |= {"seconds_train_stage": time.perf_counter() - started, "steps_done": trained.steps}
    print(f"stage training: {trained.steps} steps in {numbers['seconds_train_stage']:.0f} s -> {trained.model_dir}")
    if args.ratio_steps:
        # Both sides on the same pairs and step count, one after the other: the stage's overhead as a ratio.
        steps = args.ratio_steps
        short = replace(plan, max_steps=steps)
        started = time.perf_counter()
        train_embedder(pairs, champion.model_dir, settings.embedder, short, work / "ratio", threads=threads)
        numbers["seconds_ratio_stage"] = time.perf_counter() - started
        numbers["seconds_ratio_bare"] = bare_training(
            pairs, champion.model_dir, settings.embedder, steps, work, threads
        )
        numbers["ratio_bare_over_stage"] = numbers["seconds_ratio_bare"] / numbers["seconds_ratio_stage"]
        print(
            f"{steps} steps: stage {numbers['seconds_ratio_stage']:.0f} s, bare sentence-transformers "
            f"{numbers['seconds_ratio_bare']:.0f} s; ratio bare/stage {numbers['ratio_bare_over_stage']:.2f} "
            "(target >= 0.9)"
        )

    if args.quality:
        candidate = Embedder.from_folder(
            Path(trained.model_dir),
            batch_size=config.project.embedding.batch_size,
            threads=config.project.threads.embedding,
        )
        build_dir = work / "state"
        build_backend = open_backend(config.project.index, build_dir, SPECIALIST, dimension=candidate.dimension)
        started = time.perf_counter()
        built = plan_and_apply(
            SPECIALIST,
            settings.sources,
            settings.chunking,
            root=config.root,
            state_dir=build_dir,
            embedder=candidate,
            backend=build_backend,
            max_documents=args.max_documents or settings.index.max_documents,
            show_progress=True,
            priority_ids=suite_relevant_ids(suite, ("test", "train")),
        )
        numbers |= {"seconds_reembed": time.perf_counter() - started, "chunks_reembedded": built.chunks_embedded}
        print(f"re-embedded {built.chunks_embedded} chunks in {numbers['seconds_reembed']:.0f} s")
        new_searcher = IndexSearcher(SPECIALIST, build_dir, build_backend, configured, settings.index.search_mode)
        test = [
            case
            for case in load_cases(suite, "test")
            if any(f"{source}:{item}" in held for item in case.get("relevant_ids", []) for source in source_names)
        ][: settings.evaluation.max_cases]
        before = evaluate(searcher, live, test, input_names, f"champion {live}", settings)
        after = evaluate(new_searcher, built.version, test, input_names, "fine-tuned", settings)
        gains = paired_bootstrap_intervals(
            {m: ([e.scores[m] for e in after.examples], [e.scores[m] for e in before.examples]) for m in METRICS},
            confidence=settings.evaluation.confidence,
            samples=settings.evaluation.bootstrap_samples,
        )
        print(f"\n{len(test)} test cases, {settings.evaluation.confidence:.0%} bootstrap intervals")
        print(f"{'metric':<10} {'champion':>22} {'fine-tuned':>22} {'gain (paired interval)':>30}")
        for metric in METRICS:
            low, high = before.intervals[metric]
            low2, high2 = after.intervals[metric]
            gain = after.scores[metric] - before.scores[metric]
            print(
                f"{metric:<10} {before.scores[metric]:>6.3f} [{low:.3f}, {high:.3f}] "
                f"{after.scores[metric]:>6.3f} [{low2:.3f}, {high2:.3f}] "
                f"{gain:>+10.3f} [{gains[metric][0]:+.3f}, {gains[metric][1]:+.3f}]"
            )
            numbers |= {f"champion_{metric}": before.scores[metric], f"new_{metric}": after.scores[metric]}
            numbers |= {f"gain_{metric}_low": gains[metric][0], f"gain_{metric}_high": gains[metric][1]}
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
