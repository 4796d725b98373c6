"""How a case becomes a retrieval query and how the index answers it: one rule for every stage and serving.

The program's forward pass, the optimizer's examples, the refresh's training prompts, the DPO pairs, the
re-index retrieval gate and the server all search with `retrieval_query` and turn index hits into
passages with `search_passages`, so a specialist is trained and gated on the passages it is later served.

Usage::

    search = open_index_search(IndexTarget.from_config(config, "icd10-coder"), version)  # no query cache
    passages = search(retrieval_query({"phrase": "typhoid endocarditis"}, ["phrase"]), 5)
    context = context_retriever(search, ["phrase"], 5)  # inputs -> rendered passages (training data, DPO pairs)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cadre.config import CadreConfig
    from cadre.knowledge.reindex import IndexSearcher


@dataclass(frozen=True)
class PassageFormat:
    """Which parts of a passage the model sees: the program's `passage` settings, as the runtime reads them.

    Attributes:
        fields: the parts rendered, of `id`, `title`, `text`; always in that order (`id — title: text`).
        max_text_words: most whitespace-separated words of the text; a longer text is cut and ends with `…`.
    """

    fields: tuple[str, ...] = ("id", "title")
    max_text_words: int = 32

    @classmethod
    def from_settings(cls, program: Any) -> PassageFormat:
        """From a `ProgramSettings` (its `passage` block)."""
        return cls(tuple(program.passage.fields), program.passage.max_text_words)


ID_AND_TITLE = PassageFormat()
"""The default: `A01.02 — Typhoid fever with heart involvement`."""


@dataclass(frozen=True)
class Passage:
    """One retrieved document, as the program shows it to the model.

    Attributes:
        id: the document id the evaluation compares with `relevant_ids` (e.g. `A01.02`).
        title: one line that says what the document is.
        text: the text of the document's best-ranked chunk ("" when not carried).
    """

    id: str
    title: str
    text: str = ""

    def render(self, form: PassageFormat = ID_AND_TITLE) -> str:
        """The passage as one line of the prompt: `id — title: text`, with only the parts `form` names.

        The default (`id` and `title`) renders `A01.02 — Typhoid fever with heart involvement`, or the id alone
        when the document has no title.
        """
        head = self.id if "id" in form.fields else ""
        body = []
        if "title" in form.fields and self.title:
            body.append(self.title)
        if "text" in form.fields and self.text:
            words = self.text.split()
            cut = words[: form.max_text_words]
            body.append(" ".join(cut) + (" …" if len(words) > len(cut) else ""))
        rest = ": ".join(body)
        return f"{head} — {rest}" if head and rest else head or rest


class Retriever(Protocol):
    """Anything that returns the `k` best passages for a query, best first."""

    def __call__(self, query: str, k: int) -> list[Passage]: ...


def retrieval_query(case: Mapping[str, Any], input_names: Sequence[str]) -> str:
    """The text a case searches the index with: its input values that are set, in the program's order, joined by spaces.

    Args:
        case: a request's inputs or a suite case (extra keys are ignored).
        input_names: the program's declared inputs, in order.
    """
    return " ".join(str(case[name]) for name in input_names if case.get(name))


def search_passages(index: IndexSearcher, query: str, k: int, version: str) -> list[Passage]:
    """The `k` best documents for a query in one index version, as passages.

    Twice `k` chunks are fetched and several chunks of one document count once, at their best rank, so
    a long document cut into many chunks does not crowd the others out. A passage is the document's
    record id (the ICD-10-CM code in the demo), title and the text of its best-ranked chunk.
    """
    passages: dict[str, Passage] = {}
    for hit in index.search(query, k * 2, version=version):
        passages.setdefault(hit.record_id, Passage(hit.record_id, hit.title, hit.text))
    return list(passages.values())[:k]


def context_retriever(
    search: Retriever, input_names: Sequence[str], k: int, form: PassageFormat = ID_AND_TITLE
) -> Callable[[Mapping[str, Any]], list[str]]:
    """What a program puts in its context field for a case's inputs: the rendered passages of its query.

    The training data (`build_training_data`) and the DPO pairs (`preference_pairs`) fill their prompts with it.

    Args:
        search: the index search.
        input_names: the program's inputs, in order.
        k: passages per case (the program's `retrieve_k`, or the depth chosen on dev).
        form: the program's passage format (`PassageFormat.from_settings`).
    """

    def retrieve(inputs: Mapping[str, Any]) -> list[str]:
        return [passage.render(form) for passage in search(retrieval_query(inputs, input_names), k)]

    return retrieve


def leave_out_own(search: Retriever, cases: Iterable[Mapping[str, Any]], input_names: Sequence[str]) -> Retriever:
    """`search`, except that a case's query never finds the document with the case's own id.

    For a suite whose train cases are documents of the corpus (`evaluation.train_cases_in_corpus`, e.g. the
    pronouncer: every train word is a known word of its index). Searched as itself, such a case would find its own
    answer written down, which no served request ever does; its training prompts, optimizer demos and grounding
    must show the neighbours a served request sees. Queries of other cases (dev, test, requests) search unchanged.

    Args:
        search: the index search (a `SharedRetriever` keeps caching each query once).
        cases: the train cases (or records) with an `id`; a case without one searches unchanged.
        input_names: the program's inputs, in order (the query is `retrieval_query`).
    """
    own = {
        retrieval_query(case, input_names): str(case["id"])
        for case in cases
        if case.get("id") is not None and retrieval_query(case, input_names)
    }

    def search_without_own(query: str, k: int) -> list[Passage]:
        if query not in own:
            return search(query, k)
        return [passage for passage in search(query, k + 1) if passage.id != own[query]][:k]

    return search_without_own


def candidate_answers(passages: Sequence[Passage], choose_from: str = "id") -> list[str]:
    """What a program answering from its candidates (`program.answer.mode` constrained or score) chooses among: the
    passages' ids, or their titles (`program.answer.choose_from`), best-ranked first."""
    return [getattr(passage, choose_from) for passage in passages]


def candidate_ids(search: Retriever, input_names: Sequence[str], k: int) -> Callable[[Mapping[str, Any]], list[str]]:
    """The document ids a program answering from its candidates chooses among for a case's inputs (the same search
    as `context_retriever`, so a caching `search` runs each query once for both)."""

    def ids(inputs: Mapping[str, Any]) -> list[str]:
        return candidate_answers(search(retrieval_query(inputs, input_names), k))

    return ids


class IndexNotReady(RuntimeError):
    """The specialist has no live index yet (run the re-index flow first)."""


@dataclass(frozen=True)
class IndexTarget:
    """The slice of config that finds a specialist's champion (live) index and embeds queries.

    Attributes:
        specialist: whose index.
        state_dir: the project's state dir (the live pointer and LanceDB tables live below it).
        root: the project folder (relative model folders are read from it).
        backend: `project.index`.
        embedding: `project.embedding`: embeds the queries of versions whose manifest records no other model (a
            version re-embedded by a fine-tuned embedder is searched with the embedder it records).
        threads: `project.threads`.
        search_mode: the specialist's `index.search_mode`.
        version: the index version to search; None for whichever is live when the search opens.
        embed_runtime: what embeds the queries (`Embedder.runtime`): None for `project.embedding.runtime`, or
            `numpy` where importing torch costs more than the search (an edge bundle).
    """

    specialist: str
    state_dir: str
    root: str
    backend: Any
    embedding: Any
    threads: Any
    search_mode: str = "hybrid"
    version: str | None = None
    embed_runtime: str | None = None

    @classmethod
    def from_config(cls, config: CadreConfig, specialist: str, pin_live: bool = True) -> IndexTarget:
        """The specialist's index; with `pin_live`, pinned to the version live now, so every step of a run
        (champion and candidate alike) searches the same knowledge even if a re-index promotes meanwhile.

        Raises:
            IndexNotReady: pinning, and no version is live yet.
        """
        from cadre.knowledge.reindex import live_version

        settings = config.specialist(specialist)
        version = live_version(config.state_dir, specialist) if pin_live else None
        if pin_live and version is None:
            raise IndexNotReady(
                f"specialist {specialist!r} has no live index under {config.state_dir}; run the re-index flow first"
            )
        return cls(
            specialist,
            str(config.state_dir),
            str(config.root),
            config.project.index,
            config.project.embedding,
            config.project.threads,
            settings.index.search_mode,
            version,
        )


def open_index_search(target: IndexTarget, version: str) -> Retriever:
    """Search one version of the target's index with `search_passages`, embedding each query; nothing is cached.

    Queries are embedded with the model the version's manifest records (a version re-embedded by a fine-tuned
    embedder is searched with that embedder; `target.embedding` embeds versions that record no other), loaded
    here, so a version whose model is missing fails when it is opened rather than at its first query.

    A caller that sees the same queries again (an optimization) wraps it in its own cache
    (`cadre.prompts.program.SharedRetriever`); a server, which sees unbounded distinct queries, does not.

    Raises:
        ValueError: the model that embedded the version is not on this machine.
    """
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.index import open_backend
    from cadre.knowledge.reindex import IndexSearcher

    state_dir = Path(target.state_dir)
    embedder = Embedder.load(target.embedding, target.threads, root=Path(target.root), runtime=target.embed_runtime)
    backend = open_backend(target.backend, state_dir, target.specialist, dimension=embedder.dimension)
    index = IndexSearcher(target.specialist, state_dir, backend, embedder, target.search_mode)
    index.embedder_for(version)

    def search(query: str, k: int) -> list[Passage]:
        return search_passages(index, query, k, version)

    return search
