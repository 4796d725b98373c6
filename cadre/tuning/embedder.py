"""The retriever refresh: fine-tune a specialist's embedding model on its train split (the `embedder` stage).

Each train case with `relevant_ids` becomes one training pair: the case's retrieval query (`retrieval_query`, the
text serving searches with) and its first relevant document's indexed text (the first chunk's `content`, exactly
what the index embeds), plus hard negatives: the live index's best hits for the query that are not a relevant
document. `MultipleNegativesRankingLoss` scores every query against every positive and negative of its batch,
so the other pairs' documents are in-batch negatives too.

Training starts from the champion embedder (the model that embedded the live index, so the mined negatives are
the ones it confuses) and writes its model under `<state_dir>/embedders/<specialist>/<data>-<config>/model`,
keyed by the pairs' fingerprint and the training settings: a re-run after a kill resumes from the last checkpoint,
and a re-run after a finished training reuses the model. The flow (`flows/refresh_embedder.py`) then re-embeds the
corpus with it through the re-index engine, judges retrieval against the live index and promotes.

Usage::

    plan = plan_embedder(settings, "smoke")
    pairs = build_pairs(cases, ["phrase"], texts, hits, hard_negatives=1)
    trained = train_embedder(pairs, base_dir, settings.embedder, plan, work_root, threads=2)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.config.budget import RunBudget, parse_budget
from cadre.config.embedder import EmbedderSettings
from cadre.knowledge.chunking import Chunker, load_tokenizer
from cadre.knowledge.embedding import Embedder, model_fingerprint
from cadre.platform.env import unlogged_prints
from cadre.runtime.retrieval import retrieval_query

if TYPE_CHECKING:
    from cadre.config import CadreConfig, Specialist
    from cadre.knowledge.index import SearchHit

logger = logging.getLogger(__name__)

MARKER = "cadre_embedder.json"
"""Written last into a trained model folder: its training's identity (and part of the model's fingerprint)."""


class NoTrainPairs(ValueError):
    """The suite's train split has no case with relevant ids and a query: nothing to fine-tune on."""


@dataclass(frozen=True)
class EmbedderPlan:
    """What one retriever refresh may use.

    Attributes:
        budget: the run's budget.
        max_steps: optimizer steps (None: `epochs` passes).
        epochs: passes over the pairs when `max_steps` is None.
        max_train_pairs: training pairs used (None: all).
        max_documents: documents re-embedded per source (None: the whole corpus).
        eval_cases: test cases the retrieval gate compares on (None: the whole split).
    """

    budget: RunBudget
    max_steps: int | None
    epochs: float | None
    max_train_pairs: int | None
    max_documents: int | None
    eval_cases: int | None


def plan_embedder(specialist: Specialist, budget: RunBudget) -> EmbedderPlan:
    """`full` reads `embedder:`, `index.max_documents` and `evaluation.max_cases`; `smoke` caps steps, pairs,
    documents and cases at the specialist's `smoke:` limits (`max_train_steps` batches of pairs)."""
    budget = parse_budget(budget)
    settings = specialist.embedder
    if budget == "smoke":
        smoke = specialist.smoke
        steps = min(settings.max_steps or smoke.max_train_steps, smoke.max_train_steps)
        pairs = steps * settings.batch_size
        return EmbedderPlan(
            budget,
            steps,
            None,
            min(settings.max_train_pairs or pairs, pairs),
            smoke.max_documents,
            smoke.max_eval_cases,
        )
    return EmbedderPlan(
        budget,
        settings.max_steps,
        settings.epochs,
        settings.max_train_pairs,
        specialist.index.max_documents,
        specialist.evaluation.max_cases,
    )


# --- training pairs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPair:
    """One training example.

    Attributes:
        case_id: the suite case it comes from.
        query: the case's retrieval query.
        positive: the relevant document's indexed text.
        negatives: texts of documents that are not relevant, the live index's best first.
    """

    case_id: str
    query: str
    positive: str
    negatives: tuple[str, ...]


def usable_cases(cases: Iterable[Mapping[str, Any]], input_names: Sequence[str]) -> list[Mapping[str, Any]]:
    """The cases that make a training pair: relevant ids and a non-empty retrieval query."""
    return [case for case in cases if case.get("relevant_ids") and retrieval_query(case, input_names).strip()]


def hit_text(hit: SearchHit) -> str:
    """A hit's indexed text, as the index embedded it (`Chunk.content`)."""
    from cadre.knowledge.chunking import TITLE_SEPARATOR

    return f"{hit.title}{TITLE_SEPARATOR}{hit.text}" if hit.title else hit.text


def build_pairs(
    cases: Sequence[Mapping[str, Any]],
    input_names: Sequence[str],
    texts: Mapping[str, str],
    hits: Sequence[Sequence[tuple[str, str]]] | None,
    *,
    hard_negatives: int,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[TrainingPair]:
    """Training pairs of the usable cases, in case order, with `hard_negatives` negatives each.

    Args:
        cases: usable cases (`usable_cases`).
        input_names: the program's inputs, in order (they make the query).
        texts: record id → indexed text of the documents the cases need; a case none of whose relevant ids is
            here (not in the index, e.g. under a document cap) is left out.
        hits: per case, the live index's best hits as (record id, text), best first (None: no mining).
        hard_negatives: negatives per pair. The best hits that are not relevant, not the case's own document (a
            case whose id is a document's, `evaluation.train_cases_in_corpus`) and whose text is not the
            positive's come first; when mining finds fewer, documents of other pairs drawn at random fill in,
            so every pair has the same number (the loss takes fixed columns).
        max_pairs: keep the first this many pairs (None: all).
        seed: seed of the random fill.
    """
    rng = random.Random(seed)
    pool = sorted(set(texts.values()))
    pairs: list[TrainingPair] = []
    for position, case in enumerate(cases):
        relevant = [str(item) for item in case["relevant_ids"]]
        positive_id = next((item for item in relevant if item in texts), None)
        if positive_id is None:
            continue
        positive = texts[positive_id]
        own = str(case["id"]) if case.get("id") is not None else None  # a pronouncer train word is a document too
        negatives: list[str] = []
        for record_id, text in hits[position] if hits is not None else ():
            if len(negatives) == hard_negatives:
                break
            if record_id in relevant or record_id == own or text == positive or text in negatives:
                continue
            negatives.append(text)
        relevant_texts = {texts[item] for item in relevant if item in texts}
        while len(negatives) < hard_negatives and len(pool) > len(relevant_texts) + len(negatives):
            text = rng.choice(pool)
            if text not in relevant_texts and text not in negatives:
                negatives.append(text)
        query = retrieval_query(case, input_names)
        pairs.append(TrainingPair(str(case.get("id", position)), query, positive, tuple(negatives)))
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    return pairs


def indexed_texts(
    config: CadreConfig, specialist: str, wanted: Iterable[str], embedder: Embedder, max_documents: int | None
) -> dict[str, str]:
    """Record id → the indexed text (first chunk's content) of the wanted documents, read and chunked as the
    re-index does it (same sources, same cap, same chunking and tokenizer)."""
    from cadre.knowledge.sources import SkipReport, load_documents

    settings = config.specialist(specialist)
    wanted = set(wanted)
    chunker = Chunker(load_tokenizer(embedder.model_dir), settings.chunking)
    documents = [
        document
        for document in load_documents(
            settings.sources,
            root=config.root,
            max_document_bytes=settings.chunking.max_document_bytes,
            skips=SkipReport(),
            limit_per_source=max_documents,
            priority_ids=sorted(wanted) if max_documents else (),
        )
        if document.record_id in wanted
    ]
    texts: dict[str, str] = {}
    for document, chunks in zip(documents, chunker.chunk_many(documents), strict=True):
        if chunks:
            texts.setdefault(document.record_id, chunks[0].content)
    return texts


def pairs_fingerprint(pairs: Sequence[TrainingPair]) -> str:
    """sha256 over the pairs, in order: equal exactly when the training data is."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(asdict(pair), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


# --- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedEmbedder:
    """A fine-tuned embedding model on disk.

    Attributes:
        model_dir: the sentence-transformers folder.
        fingerprint: `model_fingerprint` of it (what an index built with it records).
        data_fingerprint: `pairs_fingerprint` of its training pairs.
        config_hash: hash of the training settings, the plan and the base model.
        steps: optimizer steps taken.
        train_seconds: wall time of the training (0 when reused).
        resumed_from_step: the checkpoint a killed run resumed from (0: none).
        reused: an earlier run had finished this exact training; nothing was trained.
        losses: (step, loss) as logged.
    """

    model_dir: str
    fingerprint: str
    data_fingerprint: str
    config_hash: str
    steps: int
    train_seconds: float
    resumed_from_step: int
    reused: bool
    losses: tuple[tuple[int, float], ...] = ()


def training_config_hash(settings: EmbedderSettings, plan: EmbedderPlan, base_fingerprint: str) -> str:
    """What makes two trainings on the same pairs the same: settings, step budget and the model trained."""
    content = {
        "settings": settings.model_dump(mode="json"),
        "max_steps": plan.max_steps,
        "epochs": plan.epochs,
        "base": base_fingerprint,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def work_dir(work_root: Path, data_fingerprint: str, config_hash: str) -> Path:
    """The folder of one training: the same pairs and settings always land in the same folder."""
    return Path(work_root) / f"{data_fingerprint[:16]}-{config_hash[:12]}"


def pair_columns(pairs: Sequence[TrainingPair]) -> dict[str, list[str]]:
    """The pairs as the columns `MultipleNegativesRankingLoss` reads: anchor, positive, negative_1 … negative_n."""
    columns: dict[str, list[str]] = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    for index in range(len(pairs[0].negatives) if pairs else 0):
        columns[f"negative_{index + 1}"] = [p.negatives[index] for p in pairs]
    return columns


def train_embedder(
    pairs: Sequence[TrainingPair],
    base_dir: Path,
    settings: EmbedderSettings,
    plan: EmbedderPlan,
    work_root: Path,
    *,
    threads: int,
    on_log: Callable[[dict[str, float], int, int], None] | None = None,
) -> TrainedEmbedder:
    """Fine-tune the model in `base_dir` on the pairs; resume or reuse an earlier run of the same training.

    Args:
        pairs: the training pairs (`build_pairs`).
        base_dir: the model fine-tuned (the champion embedder's folder).
        settings: the specialist's `embedder:` settings.
        plan: the budget's plan (steps or epochs).
        work_root: where trainings live (`<state_dir>/embedders/<specialist>`).
        threads: torch threads.
        on_log: called with (logged metrics, step, total steps) at every log step (progress).

    Raises:
        NoTrainPairs: no pairs.
    """
    if not pairs:
        raise NoTrainPairs("no training pairs: the train split has no case with relevant ids the index holds")
    data_fp = pairs_fingerprint(pairs)
    base_fp = model_fingerprint(Path(base_dir))
    config_hash = training_config_hash(settings, plan, base_fp)
    folder = work_dir(work_root, data_fp, config_hash)
    model_dir = folder / "model"
    marker = model_dir / MARKER
    if marker.is_file():
        identity = json.loads(marker.read_text())
        logger.info("reusing the finished training %s (%d steps)", folder.name, identity["steps"])
        return TrainedEmbedder(
            str(model_dir), model_fingerprint(model_dir), data_fp, config_hash, identity["steps"], 0.0, 0, True
        )
    from cadre.knowledge.embedding import torch_threads

    with torch_threads(threads):
        steps, seconds, resumed, losses = _fit(pairs, Path(base_dir), settings, plan, folder, on_log)
    identity = {
        "data_fingerprint": data_fp,
        "config_hash": config_hash,
        "base_fingerprint": base_fp,
        "steps": steps,
        "pairs": len(pairs),
        "train_seconds": round(seconds, 1),
        "weights_sha256": _weights_sha256(model_dir),
    }
    marker.write_text(json.dumps(identity, indent=1))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return TrainedEmbedder(
        str(model_dir), model_fingerprint(model_dir), data_fp, config_hash, steps, seconds, resumed, False, losses
    )


def _fit(
    pairs: Sequence[TrainingPair],
    base_dir: Path,
    settings: EmbedderSettings,
    plan: EmbedderPlan,
    folder: Path,
    on_log: Callable[[dict[str, float], int, int], None] | None,
) -> tuple[int, float, int, tuple[tuple[int, float], ...]]:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(base_dir), device=device, local_files_only=True)
    with unlogged_prints():  # datasets' fingerprinting would dump bytecode into the Prefect run log
        dataset = Dataset.from_dict(pair_columns(pairs))
    checkpoints = folder / "checkpoints"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        max_steps=plan.max_steps if plan.max_steps is not None else -1,
        num_train_epochs=plan.epochs if plan.max_steps is None else 1.0,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the steps (Transformers 5)
        lr_scheduler_type="linear",
        seed=settings.seed,
        data_seed=settings.seed,
        # Several cases share a code: a batch holding the same document twice would make it its own negative.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="steps",
        save_steps=settings.checkpoint_every,
        save_total_limit=2,
        logging_steps=max(1, min(10, settings.checkpoint_every)),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
    )
    logged: list[tuple[int, float]] = []

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
            if logs and "loss" in logs:
                logged.append((state.global_step, float(logs["loss"])))
                logger.info("embedder step %d/%d loss %.4f", state.global_step, state.max_steps, logs["loss"])
                if on_log is not None:
                    on_log(
                        {k: float(v) for k, v in logs.items() if isinstance(v, int | float)},
                        state.global_step,
                        state.max_steps,
                    )

    with unlogged_prints():
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            loss=losses.MultipleNegativesRankingLoss(model),
            callbacks=[Progress()],
        )
    resume = _last_checkpoint(checkpoints)
    resumed = int(resume.name.split("-")[-1]) if resume else 0
    if resume:
        logger.info("resuming the embedder training from %s", resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    model_dir = folder / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a save killed halfway: no marker, so write it again
    model.save(str(model_dir))
    return trainer.state.global_step, seconds, resumed, tuple(logged)


def _last_checkpoint(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    found = [path for path in checkpoints.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]
    return max(found, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _weights_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- which embedder serves -----------------------------------------------------------------------


def champion_embedder(config: CadreConfig, specialist: str) -> Embedder:
    """The embedder the specialist's index is built with: the registry's `embedder` champion (downloaded once to
    `<state_dir>/embedders/<specialist>/registry-v<N>`), else `project.embedding`."""
    from mlflow import MlflowClient

    from cadre.registry.versions import get_champion

    settings = config.project
    client = MlflowClient(settings.mlflow.uri)
    version = get_champion(client, settings.name, specialist, "embedder")
    if version is None:
        return Embedder.load(settings.embedding, settings.threads, root=config.root)
    folder = config.state_dir / "embedders" / specialist / f"registry-v{version.version}"
    if not (folder / MARKER).is_file():
        local = version.tags.get("cadre.lineage.embedder_path")
        if local and (Path(local) / MARKER).is_file():
            folder = Path(local)
        else:
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            client.download_artifacts(version.run_id, "embedder", str(partial))
            downloaded = next(path.parent for path in partial.rglob(MARKER))
            shutil.rmtree(folder, ignore_errors=True)
            downloaded.rename(folder)
            shutil.rmtree(partial, ignore_errors=True)
    return Embedder.from_folder(
        folder,
        batch_size=settings.embedding.batch_size,
        threads=settings.threads.embedding,
        registry_version=str(version.version),
        runtime=settings.embedding.runtime,
    )
