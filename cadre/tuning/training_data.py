"""Supervised fine-tuning data of a specialist: records rendered into the program's own prompts.

The adapter refresh trains on exactly the text the specialist is prompted with at inference (the idea
of DSPy's BootstrapFinetune): every record — a line of a `tuning.data` file (JSONL or Parquet with
the program's field names) or a case of the evaluation suite's *train* split (never dev or test) — is
rendered with `cadre.runtime.prompt.render_prompt` into the prompt (including the passages the
program would retrieve for it) and with `render_completion` into the target the loss is computed on.

    records, skipped = read_records(paths)
    data = build_training_data(records, spec, count_tokens=counter, retrieve=retriever,
                               max_length=256, heldout_fraction=0.05, seed=0, skipped=skipped)
    data.fingerprint   # sha256 over the rendered examples: keys checkpoints and lineage

Pipeline: validate (bad records are skipped and counted by reason) → deduplicate on the record's
field values → cap (optional: only as many examples as the step budget can consume, picked by a
seeded hash so the choice is stable) → retrieve and render → drop examples longer than
`max_length` tokens → split off a held-out share by a seeded hash of each example (an example stays
on its side as the data grows) → order canonically (by content hash), so neither the file order nor
the source order changes the data the trainer sees.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadre.config.tuning import AUTO_MAX_LENGTH, length_limit
from cadre.jsonl import read_json_lines, text_problem, write_jsonl
from cadre.runtime.prompt import PromptSpec, render_completion, render_prompt

Retrieve = Callable[[Mapping[str, Any]], list[str]]
"""The passages the program would put into its context field for one record's inputs, rendered as it shows them."""

AnswerIds = Callable[[Mapping[str, Any]], Sequence[str]]
"""The document ids a program answering from its candidates chooses among for one record's inputs."""

CountTokens = Callable[[Sequence[str]], list[int]]
"""Token counts of a batch of texts, as the trainer's tokenizer counts them (special tokens included)."""


@dataclass(frozen=True)
class Record:
    """One raw training record and where it came from."""

    source: str
    line: int
    values: dict[str, Any]


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out, and why (shown in counts and logged with the run)."""

    source: str
    line: int
    reason: str


@dataclass(frozen=True)
class TrainingExample:
    """A rendered prompt-completion pair (trl's prompt-completion format: loss on the completion only)."""

    prompt: str
    completion: str
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.prompt}\x00{self.completion}".encode()).hexdigest()


@dataclass(frozen=True)
class TrainingData:
    """The rendered, filtered and split training set of one refresh.

    Attributes:
        train: examples the optimizer sees, in canonical order.
        heldout: examples kept out for the eval loss.
        fingerprint: sha256 over both splits' rendered examples (keys checkpoints, recorded as lineage).
        counts: records read, skipped per reason, duplicates, capped, too long, train and held-out sizes.
        skipped: the records left out as invalid, with reasons.
        max_length: the token limit the examples were filtered by (`auto` resolved: the longest kept example).
    """

    train: list[TrainingExample]
    heldout: list[TrainingExample]
    fingerprint: str
    counts: dict[str, int]
    skipped: list[SkippedRecord] = field(default_factory=list)
    max_length: int = 0

    def columns(self, split: str = "train") -> dict[str, list[str]]:
        """The split as `{"prompt": [...], "completion": [...]}`, ready for `datasets.Dataset.from_dict`."""
        examples = self.train if split == "train" else self.heldout
        return {"prompt": [e.prompt for e in examples], "completion": [e.completion for e in examples]}

    def write_jsonl(self, path: Path) -> Path:
        """Write both splits as JSON lines (`split`, `prompt`, `completion`, `source`) for inspection and logging.

        Written atomically (`cadre.jsonl.write_jsonl`); examples are built from checked records, so none is left out.
        """
        rows = (
            {"split": split, "prompt": example.prompt, "completion": example.completion, "source": example.source}
            for split, examples in (("train", self.train), ("heldout", self.heldout))
            for example in examples
        )
        write_jsonl(path, rows)
        return path


# --- reading -------------------------------------------------------------------------------------


def read_records(paths: Iterable[Path]) -> tuple[list[Record], list[SkippedRecord]]:
    """Read JSONL (`.jsonl`, `.json` lines) and Parquet files into records; unreadable lines are skipped.

    JSONL is read as bytes, line by line (`cadre.jsonl.read_json_lines`): a line that is not UTF-8,
    not JSON, not an object, not text (a lone surrogate escape) or longer than `MAX_LINE_BYTES` is
    skipped with its file, line and reason; the good lines are read.

    Args:
        paths: files in the order their records should be considered (earlier wins on duplicates).

    Returns:
        The records (one per JSON object or Parquet row) and the skipped lines with reasons.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file has an extension that is neither JSONL nor Parquet.
    """
    records: list[Record] = []
    skipped: list[SkippedRecord] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"training data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                problem = text_problem(row)
                if problem:
                    skipped.append(SkippedRecord(str(path), number, f"not text: the row {problem}"))
                else:
                    records.append(Record(str(path), number, row))
        elif suffix in (".jsonl", ".json", ".ndjson"):
            for line in read_json_lines(path):
                if line.problem:
                    skipped.append(SkippedRecord(str(path), line.line, line.problem))
                else:
                    records.append(Record(str(path), line.line, line.value))
        else:
            raise ValueError(
                f"training data file {path} must be JSONL (.jsonl) or Parquet (.parquet), not {suffix or 'no extension'}"
            )
    return records, skipped


def training_sources(suite_dir: Path | None, data_files: Sequence[Path], from_eval_train: bool) -> list[Path]:
    """The files a refresh trains on: the configured data files, then the suite's train split if enabled.

    Only the train split is ever read: dev selects and test judges, so training on them would make
    the gate's numbers meaningless.
    """
    sources = list(data_files)
    if from_eval_train and suite_dir is not None:
        sources.append(Path(suite_dir) / "train.jsonl")
    for source in sources:
        if (
            Path(source).stem in ("dev", "test")
            and suite_dir is not None
            and Path(source).parent.resolve() == Path(suite_dir).resolve()
        ):
            raise ValueError(f"{source} is an evaluation split; fine-tuning may only read the suite's train split")
    return sources


# --- building ------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _validate(record: Record, spec: PromptSpec) -> tuple[dict[str, Any], dict[str, str]] | str:
    """The record's input and output values, or why it cannot be used."""
    inputs: dict[str, Any] = {}
    for f in spec.inputs:
        if f.name == spec.context_field:
            continue  # filled by retrieval, the way the program fills it
        text = _text(record.values.get(f.name))
        if text is None:
            return f"missing or empty input field {f.name!r}"
        inputs[f.name] = text
    outputs: dict[str, str] = {}
    for f in spec.outputs:
        text = _text(record.values.get(f.name))
        if text is None:
            return f"missing or empty output field {f.name!r}"
        outputs[f.name] = text
    return inputs, outputs


def _hash_fraction(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): stable split and cap decisions."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / float(1 << 60)


def _identity(inputs: Mapping[str, Any], outputs: Mapping[str, str]) -> str:
    """Records with the same field values render the same example (retrieval depends only on inputs)."""
    return json.dumps([sorted(inputs.items()), sorted(outputs.items())], ensure_ascii=False)


def read_rank(seed: int, inputs: Mapping[str, Any], outputs: Mapping[str, str]) -> float:
    """Where a record stands in the order `build_training_data` reads records under a cap (stable per seed)."""
    return _hash_fraction(seed, _identity(inputs, outputs))


def read_first(
    cases: Sequence[Mapping[str, Any]], input_names: Sequence[str], output_names: Sequence[str], seed: int, count: int
) -> list[Mapping[str, Any]]:
    """The first `count` cases `build_training_data` would read under a cap (cases missing a field are skipped), so
    a capped smoke index can hold their documents: a program answering one of its candidates trains only on cases
    whose answer the index holds."""
    ranked = []
    seen: set[str] = set()
    for case in cases:
        inputs = {name: _text(case.get(name)) for name in input_names}
        outputs = {name: _text(case.get(name)) for name in output_names}
        identity = _identity(inputs, outputs)
        if None not in inputs.values() and None not in outputs.values() and identity not in seen:  # as it reads
            seen.add(identity)
            ranked.append((read_rank(seed, inputs, outputs), case))
    ranked.sort(key=lambda item: item[0])
    return [case for _, case in ranked[:count]]


def build_training_data(
    records: Sequence[Record],
    spec: PromptSpec,
    *,
    count_tokens: CountTokens,
    max_length: int | str,
    heldout_fraction: float,
    seed: int,
    retrieve: Retrieve | None = None,
    demos: Sequence[Mapping[str, Any]] = (),
    instruction: str | None = None,
    max_examples: int | None = None,
    skipped: Sequence[SkippedRecord] = (),
    answer_ids: AnswerIds | None = None,
) -> TrainingData:
    """Render records into the program's prompt-completion examples, filter, deduplicate and split them.

    Args:
        records: raw records (see `read_records`), earlier ones win on duplicates.
        spec: the program's prompt spec (`PromptSpec.from_settings(program)`).
        count_tokens: token counter of the base model's tokenizer; an example whose prompt and
            completion together exceed `max_length` tokens is dropped (never truncated: a cut
            prompt would teach answers to questions the model was not asked).
        max_length: most tokens per example; `auto` for the longest example up to `AUTO_MAX_LENGTH`.
        heldout_fraction: share of examples held out for the eval loss.
        seed: seeds the held-out choice and the cap.
        retrieve: fills the spec's context field the way the program does at inference; required
            when the spec has a context field.
        demos: the demos the serving program shows before the question (none for a zero-shot program).
        instruction: the serving program's instruction, when an optimizer changed it.
        max_examples: render at most this many (the rest could never be reached by the step
            budget); None renders everything.
        skipped: records already skipped while reading, carried into the counts.
        answer_ids: for a program that answers one of the retrieved ids (answer mode `constrained` or `score`), the
            ids it would choose among for a record's inputs. A record whose answer is not among them teaches an
            answer the program can never give: it is left out and counted as `ungrounded`. Twice `max_examples`
            records are retrieved, so that about `max_examples` grounded ones remain.

    Returns:
        The training data with its fingerprint and counts.

    Raises:
        ValueError: the spec needs retrieval and none was given, or nothing is left to train on.
    """
    if spec.context_field and retrieve is None:
        raise ValueError(
            f"the program retrieves into {spec.context_field!r}; pass the program's retriever to render its prompts"
        )
    bad = list(skipped)
    seen: set[str] = set()
    usable: list[tuple[Record, dict[str, Any], dict[str, str]]] = []
    duplicates = 0
    for record in records:
        checked = _validate(record, spec)
        if isinstance(checked, str):
            bad.append(SkippedRecord(record.source, record.line, checked))
            continue
        inputs, outputs = checked
        identity = _identity(inputs, outputs)
        if identity in seen:
            duplicates += 1
            continue
        seen.add(identity)
        usable.append((record, inputs, outputs))

    usable.sort(key=lambda item: read_rank(seed, item[1], item[2]))  # the cap keeps a stable choice (`read_first`)
    available = len(usable)
    if max_examples is not None:
        usable = usable[: max_examples * 2 if answer_ids is not None else max_examples]

    ungrounded = 0
    if answer_ids is not None:
        grounded = []
        for item in usable:
            answer = next(iter(item[2].values()), None)
            if answer in answer_ids(item[1]):
                grounded.append(item)
            else:
                ungrounded += 1
        usable = grounded[:max_examples] if max_examples is not None else grounded
    capped = available - len(usable) - ungrounded

    if spec.context_field:
        for _, inputs, _ in usable:
            inputs[spec.context_field] = list(retrieve(inputs))

    rendered = [
        TrainingExample(
            render_prompt(spec, inputs, demos, instruction=instruction),
            render_completion(spec, outputs),
            f"{record.source}:{record.line}",
        )
        for record, inputs, outputs in usable
    ]
    lengths = count_tokens([e.prompt + e.completion for e in rendered]) if rendered else []
    limit = length_limit(max_length)
    kept = [e for e, n in zip(rendered, lengths, strict=True) if n <= limit]
    resolved = max((n for n in lengths if n <= limit), default=limit) if max_length == "auto" else limit
    too_long = len(rendered) - len(kept)
    if not kept:
        reasons = Counter(s.reason.split(":")[0] for s in bad).most_common(3)
        hint = ""
        if too_long:
            typical = sorted(lengths)[len(lengths) // 2]
            hint = (
                f"; the serving program's prompts (instruction, demos, passages) are ~{typical} tokens: raise tuning.max_length "
                f"above that (`auto` follows them up to {AUTO_MAX_LENGTH}), or serve a program with fewer demos or passages"
            )
        if ungrounded and not rendered:
            hint = (
                "; the program answers one of the retrieved ids, and no record's answer was among its records' "
                "candidates: check that the records' answers are document ids of the index, or raise retrieve_k"
            )
        raise ValueError(
            f"no training examples left: {len(records)} records read, {len(bad)} invalid {reasons}, "
            f"{duplicates} duplicates, {ungrounded} whose answer is not among the retrieved candidates, "
            f"{too_long} longer than max_length={limit} tokens{hint}"
        )

    kept.sort(key=lambda e: e.digest)
    heldout = [e for e in kept if _hash_fraction(seed, e.digest) < heldout_fraction]
    if len(heldout) == len(kept):  # a tiny set: never hold out everything
        heldout = heldout[:-1]
    held = {e.digest for e in heldout}
    train = [e for e in kept if e.digest not in held]

    counts: dict[str, int] = {
        "records": len(records) + len(skipped),
        "invalid": len(bad),
        "duplicates": duplicates,
        "ungrounded": ungrounded,
        "capped": capped,
        "too_long": too_long,
        "train": len(train),
        "heldout": len(heldout),
    }
    return TrainingData(
        train=train,
        heldout=heldout,
        fingerprint=fingerprint(train, heldout),
        counts=counts,
        skipped=bad,
        max_length=resolved,
    )


def fingerprint(train: Sequence[TrainingExample], heldout: Sequence[TrainingExample]) -> str:
    """sha256 over the rendered examples of both splits, in order (the data the trainer sees)."""
    digest = hashlib.sha256()
    for split, examples in (("train", train), ("heldout", heldout)):
        for example in examples:
            digest.update(f"{split}\x00{example.prompt}\x00{example.completion}\x01".encode())
    return digest.hexdigest()


def examples_needed(
    max_steps: int | None, batch_size: int, gradient_accumulation: int, heldout_fraction: float
) -> int | None:
    """How many examples a step budget can consume (one pass), with room for the held-out share and drops.

    None when training is measured in epochs: then every example is used.
    """
    if max_steps is None:
        return None
    consumed = max_steps * batch_size * gradient_accumulation
    return math.ceil(consumed / max(1.0 - heldout_fraction, 0.5) * 1.1) + 8


def token_counter(tokenizer: Any) -> CountTokens:
    """A `CountTokens` over a transformers tokenizer, counting the BOS/EOS the trainer adds."""

    def count(texts: Sequence[str]) -> list[int]:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        eos = 1  # trl appends EOS to every completion
        return [len(ids) + eos for ids in encoded]

    return count
