"""The specialist's DSPy program, and the DSPy pieces that let a *base* model run it.

A specialist program is a class (`SpecialistProgram`) built from `ProgramSettings`: a signature made
from the settings (its docstring is the instruction; the retrieved passages come first as the
context field), a `dspy.Predict` or `dspy.ChainOfThought` over it, and a `forward` that retrieves
`retrieve_k` passages from the specialist's champion index and predicts. Its state (instruction and
demos) is saved as JSON with `program.save(path)` and loaded with `load_program` — no pickle.

Two DSPy extension points make the packaged Gemma 3 270M (a base model, not instruction-tuned) usable:

- `CompletionAdapter` renders a call as ONE completion prompt, exactly `cadre.runtime.prompt`'s
  `render_prompt` (the text the refresh flow fine-tunes on), and parses with `parse_completion`;
  an answer it cannot read is None (scored wrong), never an exception.
- `CompletionLM` (a `dspy.BaseLM`) sends that prompt through a `cadre.runtime.lm.CompletionClient`, with
  `max_tokens` and the format's stop sequences. It consults DSPy's disk cache (`DSPY_CACHEDIR`, under
  the state dir) before every call, so a re-run with unchanged inputs makes no LM call; it counts
  requests, real calls, cache hits, tokens and cost in an `LMUsage`, and enforces a `Budget`: the
  request that would exceed `max_lm_calls` or `max_wall_seconds` raises `BudgetExhausted` instead of
  being made.

Which LM: `lm_target(config)` is the llama.cpp server `cadre up` starts (or any OpenAI-compatible
`project.lm.api_base`); with the champion LoRA adapter (GGUF) it is llama.cpp in this process with the
adapter applied (`lm_target(config, adapter_gguf)`), since the shared server serves the base model.

Usage::

    target = lm_target(config)                                    # or lm_target(config, adapter_gguf=path)
    lm = CompletionLM(build_client(target), model_id=target.identity, max_tokens=12)
    program = SpecialistProgram(settings.program, open_retriever(IndexTarget.from_config(config, "icd10-coder")))
    with program_context(lm, settings.program):
        prediction = program(phrase="typhoid endocarditis")     # prediction.code, .retrieved_ids
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from cadre.runtime.lm import (
    CompletionClient,
    EndpointClient,
    LlamaCppClient,
    LMUnavailable,
    answer_from_candidates,
    llama_cpp_identity,
)
from cadre.runtime.prompt import FieldSpec, PromptSpec, parse_completion, render_prompt
from cadre.runtime.retrieval import (
    IndexNotReady,
    IndexTarget,
    Passage,
    PassageFormat,
    Retriever,
    candidate_answers,
    open_index_search,
    retrieval_query,
)
from cadre.runtime.serving_prompt import demo_dicts

if TYPE_CHECKING:
    from cadre.config import CadreConfig, ProgramSettings

CACHE_NAMESPACE = "cadre.program.CompletionLM"
"""Part of every cache key, so Cadre's entries never collide with DSPy's own LM entries."""


# --------------------------------------------------------------------------------------- stopping


class RunStopped(BaseException):
    """Stops an optimization from inside an LM call.

    It derives from BaseException on purpose, like KeyboardInterrupt: DSPy's evaluators and
    optimizers catch `Exception` per example and would turn a budget stop, or an unreachable LM, into
    a stream of wrong answers that the optimizer then selects among. A `RunStopped` passes through
    them to the loop that started the run.
    """


class BudgetExhausted(RunStopped):
    """The optimization used up its LM-call or wall-time budget; no further LM call was made."""


class LMUnreachable(RunStopped):
    """The LM endpoint could not be reached after the client's retries."""


# ----------------------------------------------------------------------------------------- budget


@dataclass
class Budget:
    """Hard caps on one optimization: LM requests and wall time.

    The call cap counts every request the optimizer makes, answered by the model or by the cache:
    it bounds the *search*, so the candidate depends only on config, data and the cap, and a re-run
    with the same inputs reproduces it from the cache with no new LM call (a cap on real calls alone
    would let a re-run spend a fresh allowance searching further). Real calls never exceed requests,
    so the cap bounds cost too. A wall-time stop is not reproducible (cache hits are faster).

    Attributes:
        max_lm_calls: most LM requests; None for no cap.
        max_wall_seconds: most seconds since `start()`; None for no cap.
    """

    max_lm_calls: int | None = None
    max_wall_seconds: float | None = None
    started_at: float | None = field(default=None, repr=False)

    def start(self) -> Budget:
        """Start the wall clock (once); returns self."""
        if self.started_at is None:
            self.started_at = time.monotonic()
        return self

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def check(self, requests_made: int) -> None:
        """Raise `BudgetExhausted` if one more LM request would break a cap.

        Args:
            requests_made: LM requests made so far under this budget (real calls and cache hits).
        """
        if self.max_lm_calls is not None and requests_made >= self.max_lm_calls:
            raise BudgetExhausted(f"LM-call budget used up: {requests_made} of {self.max_lm_calls} calls made")
        if self.max_wall_seconds is not None and self.elapsed_s >= self.max_wall_seconds:
            raise BudgetExhausted(f"wall-time budget used up: {self.elapsed_s:.0f} s of {self.max_wall_seconds:.0f} s")


@dataclass
class LMUsage:
    """What the LM did: requests, of which real calls (the ones that cost) and cache hits; tokens, cost, LM time.

    `replayed_seconds` is the time the cache hits took when they were first answered: an evaluation
    adds it to its measured latency, so a latency gate judges the model, not the cache.
    """

    requests: int = 0
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    lm_seconds: float = 0.0
    replayed_seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def snapshot(self) -> LMUsage:
        return LMUsage(**asdict(self))

    def since(self, earlier: LMUsage) -> LMUsage:
        """The usage between `earlier` (a snapshot) and now."""
        return LMUsage(**{key: value - getattr(earlier, key) for key, value in asdict(self).items()})

    def plus(self, other: LMUsage) -> LMUsage:
        """This usage and `other` together (e.g. the shards of one evaluation)."""
        return LMUsage(**{key: value + getattr(other, key) for key, value in asdict(self).items()})

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """As MLflow metrics: `{prefix}lm_requests`, `lm_calls` (real), `lm_cache_hits`, tokens, `cost_usd`, `lm_seconds`."""
        return {
            f"{prefix}lm_requests": float(self.requests),
            f"{prefix}lm_calls": float(self.calls),
            f"{prefix}lm_cache_hits": float(self.cache_hits),
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}prompt_tokens": float(self.prompt_tokens),
            f"{prefix}completion_tokens": float(self.completion_tokens),
            f"{prefix}cost_usd": self.cost_usd,
            f"{prefix}lm_seconds": round(self.lm_seconds, 3),
        }


# ---------------------------------------------------------------------------------------- the LM


class CompletionLM(dspy.BaseLM):
    """A DSPy LM that continues one prompt through a `CompletionClient`, cached, counted and budgeted.

    DSPy calls `forward` with either `prompt` (our adapter, GEPA's reflection) or chat `messages`
    (another adapter, e.g. MIPROv2's proposer under ChatAdapter); messages are joined into one text,
    since the model is a base model without a chat template. The response is OpenAI-shaped, which is
    what a DSPy 3.4 `BaseLM.forward` must return.

    Copies made by DSPy (`lm.copy(rollout_id=…)`) share the client, the usage counters and the budget.
    """

    def __init__(
        self,
        client: CompletionClient,
        *,
        model_id: str,
        max_tokens: int,
        temperature: float = 0.0,
        budget: Budget | None = None,
        usage: LMUsage | None = None,
        usd_per_1k_tokens: float = 0.0,
        cache: bool = True,
    ):
        """Build the LM.

        Args:
            client: where completions come from.
            model_id: what the cache keys on: the model (and adapter) that answers, not its address.
            max_tokens: default tokens per completion (a call may pass its own).
            temperature: default sampling temperature.
            budget: caps on real calls; None for none.
            usage: counters to add to (shared with other LMs of the same run); a new one by default.
            usd_per_1k_tokens: price used for the cost estimate (0 for a local model).
            cache: consult and fill DSPy's cache.
        """
        super().__init__(
            model=f"cadre/{model_id}",
            model_type="text",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            num_retries=0,
        )
        self.client = client
        self.model_id = model_id
        self.budget = budget
        self.usage = usage if usage is not None else LMUsage()
        self.usd_per_1k_tokens = usd_per_1k_tokens
        self._lock = threading.Lock()

    def forward(
        self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Complete `prompt` (or the joined `messages`); return an OpenAI-shaped completion response."""
        text = prompt if prompt is not None else "\n\n".join(_message_text(m) for m in messages or [])
        options = {**self.kwargs, **kwargs}
        request = {
            "_fn_identifier": CACHE_NAMESPACE,
            "model_id": self.model_id,
            "prompt": text,
            "max_tokens": int(options.get("max_tokens") or 64),
            "stop": list(options.get("stop") or []),
            "temperature": float(options.get("temperature") or 0.0),
            "rollout_id": options.get("rollout_id"),
        }
        mode = options.get("answer_mode") or "free"
        if mode != "free":  # part of the cache key only when set, so free answers keep their cached entries
            request["answer_mode"] = mode
            request["candidates"] = list(options.get("candidates") or [])
            if options.get("retrieval_weight"):
                request["retrieval_weight"] = float(options["retrieval_weight"])
        with self._lock:
            if self.budget is not None:
                self.budget.check(self.usage.requests)
            self.usage.requests += 1  # reserved first, so concurrent callers cannot overshoot the cap
        use_cache = options.get("cache", self.cache)
        answer = dspy.cache.get(request) if use_cache else None
        if answer is not None:
            with self._lock:
                self.usage.cache_hits += 1
                self.usage.replayed_seconds += float(answer.get("seconds") or 0.0)
            return _response(self.model, answer, billed=False)
        answer = self._complete(request)
        if use_cache:
            dspy.cache.put(request, answer)
        return _response(self.model, answer, billed=True)

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.usage.calls += 1
        try:
            if request.get("answer_mode"):
                completion = answer_from_candidates(
                    _CachedScores(self.client, self.model_id) if self.cache else self.client,
                    request["prompt"],
                    request["candidates"],
                    mode=request["answer_mode"],
                    max_tokens=request["max_tokens"],
                    stop=request["stop"],
                    temperature=request["temperature"],
                    retrieval_weight=request.get("retrieval_weight", 0.0),
                )
            else:
                completion = self.client.complete(
                    request["prompt"],
                    max_tokens=request["max_tokens"],
                    stop=request["stop"],
                    temperature=request["temperature"],
                )
        except LMUnavailable as error:
            raise LMUnreachable(str(error)) from error
        cost = (completion.prompt_tokens + completion.completion_tokens) / 1000.0 * self.usd_per_1k_tokens
        with self._lock:
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += completion.completion_tokens
            self.usage.cost_usd += cost
            self.usage.lm_seconds += completion.seconds
        return {
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "cost_usd": cost,
            "seconds": completion.seconds,
        }


class _CachedScores:
    """A client whose candidate scores go through DSPy's disk cache, so the same prompt and candidates are scored
    once however many retrieval weights are tried on them (each weight is its own answer in the cache)."""

    def __init__(self, client: CompletionClient, model_id: str):
        self.client, self.model_id = client, model_id

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.complete(*args, **kwargs)

    def score(self, prompt: str, continuations: list[str], penalties: Sequence[float] | None = None) -> list[float]:
        """Every continuation's full score, cached (`penalties` are not passed on: the scores serve every weight)."""
        key = {
            "_fn_identifier": CACHE_NAMESPACE + ".score",
            "model_id": self.model_id,
            "prompt": prompt,
            "continuations": list(continuations),
        }
        cached = dspy.cache.get(key)
        if cached is not None:
            return list(cached["scores"])
        scores = self.client.score(prompt, continuations)
        dspy.cache.put(key, {"scores": list(scores)})
        return scores


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # content parts
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return str(content)


def _response(model: str, answer: Mapping[str, Any], billed: bool) -> dict[str, Any]:
    usage = (
        {
            "prompt_tokens": answer["prompt_tokens"],
            "completion_tokens": answer["completion_tokens"],
            "total_tokens": answer["prompt_tokens"] + answer["completion_tokens"],
        }
        if billed
        else {}
    )
    return {
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer["text"]}}],
        "usage": usage,
        "cache_hit": not billed,
    }


def use_disk_cache(cache_dir: str | Path) -> Path:
    """Point DSPy's cache (memory + disk) at `cache_dir`, unless it is there already.

    `cadre_env` sets `DSPY_CACHEDIR` to `<state_dir>/cache/dspy`, but DSPy reads it only when its
    cache is first built; this makes the location explicit for the process.
    """
    path = Path(cache_dir).resolve()
    current = getattr(dspy.cache, "disk_cache_dir", None)
    if current is None or Path(current).resolve() != path:
        path.mkdir(parents=True, exist_ok=True)
        dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(path))
    os.environ["DSPY_CACHEDIR"] = str(path)
    return path


# ----------------------------------------------------------------------------------- the adapter


class CompletionAdapter(dspy.Adapter):
    """Formats a DSPy call as one `cadre.runtime.prompt` prompt and reads the completion back.

    The prompt is `render_prompt(spec, inputs, demos, instruction=signature.instructions)`, sent as a
    single user message; `spec` comes from the signature (its input fields in order, the context field
    first, its output fields), so an optimizer's new instruction or demos change the prompt and nothing
    else. Parsing never raises: a completion without a readable answer gives None values.
    """

    def __init__(self, context_field: str | None = "context"):
        """Args:
        context_field: the input field that carries the retrieved passages (rendered numbered).
        """
        super().__init__()
        self.context_field = context_field

    def prompt_spec(self, signature: type[dspy.Signature]) -> PromptSpec:
        """The `PromptSpec` of a signature (the same one `PromptSpec.from_settings` builds for its settings)."""

        def spec_of(fields: Mapping[str, Any]) -> tuple[FieldSpec, ...]:
            return tuple(FieldSpec(name, (f.json_schema_extra or {}).get("desc", "")) for name, f in fields.items())

        context = self.context_field if self.context_field in signature.input_fields else None
        return PromptSpec(
            signature.instructions.strip(), spec_of(signature.input_fields), spec_of(signature.output_fields), context
        )

    def format(
        self, signature: type[dspy.Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One user message holding the whole completion prompt."""
        spec = self.prompt_spec(signature)
        return [{"role": "user", "content": render_prompt(spec, inputs, demos, instruction=spec.instruction)}]

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        """The output fields read from a completion; a field the model did not produce is None."""
        return parse_completion(self.prompt_spec(signature), completion or "")

    def __call__(
        self,
        lm: dspy.BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[dspy.Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        # Replaces Adapter.__call__, which raises on an empty completion; here it is an unanswered case.
        spec = self.prompt_spec(signature)
        prompt = self.format(signature, demos, inputs)[0]["content"]
        outputs = lm(prompt=prompt, **{"stop": spec.stop, **lm_kwargs})
        return [self.parse(signature, _output_text(output)) for output in outputs]

    async def acall(
        self,
        lm: dspy.BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[dspy.Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        spec = self.prompt_spec(signature)
        prompt = self.format(signature, demos, inputs)[0]["content"]
        outputs = await lm.acall(prompt=prompt, **{"stop": spec.stop, **lm_kwargs})
        return [self.parse(signature, _output_text(output)) for output in outputs]


def _output_text(output: Any) -> str:
    if isinstance(output, Mapping):
        return str(output.get("text") or "")
    return str(output or "")


# ------------------------------------------------------------------------------------- retrieval


class SharedRetriever:
    """Wraps a retriever so programs share it: deep copies (DSPy copies programs a lot) return the same
    object instead of copying an index and an embedding model, and each query is searched once per run."""

    def __init__(self, retrieve: Retriever, version: str | None = None):
        self._retrieve = retrieve
        self.version = version
        self._seen: dict[tuple[str, int], list[Passage]] = {}
        self._lock = threading.Lock()

    def __call__(self, query: str, k: int) -> list[Passage]:
        key = (query, k)
        with self._lock:
            if key in self._seen:
                return self._seen[key]
        found = list(self._retrieve(query, k))
        with self._lock:
            self._seen[key] = found
        return found

    def __deepcopy__(self, memo: dict) -> SharedRetriever:
        return self


def open_retriever(target: IndexTarget) -> SharedRetriever:
    """Search the specialist's champion (live) index with the runtime's search rule, each query once per run.

    Every search goes to one version: the target's pinned version, else the one live when this opens.
    A passage is a document's record id and title (`cadre.runtime.retrieval.search_passages`), which is
    what the program shows the model (`CODE — title`) and what the evaluation compares with `relevant_ids`.

    Raises:
        IndexNotReady: no index version is live for the specialist.
    """
    from cadre.knowledge.reindex import live_version

    state_dir = Path(target.state_dir)
    live = target.version or live_version(state_dir, target.specialist)
    if live is None:
        raise IndexNotReady(
            f"specialist {target.specialist!r} has no live index under {state_dir}; run the re-index flow first"
        )
    return SharedRetriever(open_index_search(target, live), version=live)


# ------------------------------------------------------------------------------------- the program


def make_signature(settings: ProgramSettings) -> type[dspy.Signature]:
    """The program's signature class, built from `ProgramSettings`.

    Its docstring is the instruction; the context field (when retrieving) is the first input, then
    the configured inputs, then the outputs — the order `PromptSpec.from_settings` renders.
    """
    fields: dict[str, tuple[type, Any]] = {}
    if settings.retrieve_k:
        fields[settings.context_field] = (list[str], dspy.InputField(desc="retrieved passages"))
    for item in settings.inputs:
        fields[item.name] = (str, dspy.InputField(desc=item.description))
    for item in settings.outputs:
        fields[item.name] = (str, dspy.OutputField(desc=item.description))
    return dspy.make_signature(fields, settings.instruction.strip(), signature_name="SpecialistSignature")


CHOICES_KEY = "cadre"
"""Key of a saved program's JSON holding what the flow chose on dev (`answer_mode`, `retrieve_k`, `retrieval_weight`)."""


class SpecialistProgram(dspy.Module):
    """Retrieve `retrieve_k` passages from the champion index, then predict the output fields.

    Returns a `dspy.Prediction` with the output fields, `retrieved_ids` (ranked ids, for the
    retrieval metrics) and the rendered context. With an answer mode other than `free` the LM answers
    one of the retrieved ids, or titles (`answer.choose_from`; `cadre.runtime.lm.answer_from_candidates`);
    `answer_mode` and `retrieve_k` start as declared and may be replaced by what the flow chose on dev (`choose`),
    which `save_program` records in the JSON and `load_program` reads back.
    """

    def __init__(self, settings: ProgramSettings, retriever: Retriever | None = None):
        """Build the program.

        Args:
            settings: the specialist's `ProgramSettings`.
            retriever: the champion index's search; required when `settings.retrieve_k > 0`.
        """
        super().__init__()
        if settings.retrieve_k and retriever is None:
            raise ValueError("this program retrieves (retrieve_k > 0) but no retriever was given")
        self.input_names = [item.name for item in settings.inputs]
        self.output_names = [item.name for item in settings.outputs]
        self.context_field = settings.context_field if settings.retrieve_k else None
        self.retrieve_k = settings.retrieve_k
        self.answer_mode = settings.answer.mode
        self.choose_from = settings.answer.choose_from
        self.retrieval_weight = settings.answer.retrieval_weight if settings.answer.mode == "score" else 0.0
        self.passage_format = PassageFormat.from_settings(settings)
        self._declared = self.choices
        self.retriever = (
            SharedRetriever(retriever)
            if retriever is not None and not isinstance(retriever, SharedRetriever)
            else retriever
        )
        signature = make_signature(settings)
        self.answer = (
            dspy.ChainOfThought(signature) if settings.module == "chain_of_thought" else dspy.Predict(signature)
        )

    def forward(self, **inputs: Any) -> dspy.Prediction:
        passages: list[Passage] = []
        arguments = {name: inputs.get(name) for name in self.input_names}
        if self.context_field:
            passages = self.retriever(retrieval_query(arguments, self.input_names), self.retrieve_k)
            arguments = {self.context_field: [p.render(self.passage_format) for p in passages], **arguments}
        if self.answer_mode != "free":
            config = {"answer_mode": self.answer_mode, "candidates": candidate_answers(passages, self.choose_from)}
            if self.retrieval_weight:
                config["retrieval_weight"] = self.retrieval_weight
            answer = self.answer(**arguments, config=config)
        else:
            answer = self.answer(**arguments)
        outputs = {name: answer.get(name) for name in self.output_names}
        return dspy.Prediction(
            **outputs,
            retrieved_ids=[p.id for p in passages],
            **({self.context_field: arguments[self.context_field]} if self.context_field else {}),
        )

    def choose(self, answer_mode: str, retrieve_k: int, retrieval_weight: float = 0.0) -> SpecialistProgram:
        """Answer with `answer_mode` from `retrieve_k` passages (weighing the retriever's ranking by
        `retrieval_weight` when scoring) from now on: what the flow chose on dev; returns self."""
        self.answer_mode = answer_mode
        self.retrieve_k = retrieve_k if self.context_field else 0
        self.retrieval_weight = float(retrieval_weight) if answer_mode == "score" else 0.0
        return self

    @property
    def choices(self) -> dict[str, Any]:
        """What a saved program records beside DSPy's state: its answer mode, retrieval depth and (when scoring
        with one) the weight of the retriever's ranking."""
        chosen: dict[str, Any] = {"answer_mode": self.answer_mode, "retrieve_k": self.retrieve_k}
        if self.retrieval_weight:
            chosen["retrieval_weight"] = self.retrieval_weight
        return chosen


def load_program(path: str | Path, settings: ProgramSettings, retriever: Retriever | None = None) -> SpecialistProgram:
    """A program built from `settings` with the saved state (instruction, demos) of `path` (JSON), answering
    with the answer mode and retrieval depth recorded in it (a program saved without them keeps the declared ones)."""
    program = SpecialistProgram(settings, retriever)
    program.load(str(path))
    choices = saved_choices(path)
    if choices:
        program.choose(
            choices.get("answer_mode", program.answer_mode),
            choices.get("retrieve_k", program.retrieve_k),
            choices.get("retrieval_weight", 0.0),
        )
    return program


def saved_choices(path: str | Path) -> dict[str, Any]:
    """The answer mode and retrieval depth a saved program records (`{}` for a program saved without them)."""
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    return dict(state.get(CHOICES_KEY) or {})


def save_program(program: SpecialistProgram, path: str | Path) -> str:
    """Save the program's state as JSON (no pickle) and return its fingerprint (`program_fingerprint`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), save_program=False)
    if program.choices != program._declared:  # a program that answers as declared keeps DSPy's bytes alone
        state = json.loads(path.read_text(encoding="utf-8"))
        state[CHOICES_KEY] = program.choices
        path.write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    return program_fingerprint(path)


def program_fingerprint(path: str | Path) -> str:
    """sha256 of a saved program's state, without the dependency versions DSPy adds to the file."""
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    state.pop("metadata", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def predictor_prompts(program: dspy.Module) -> list[dict[str, Any]]:
    """Each predictor's instruction and demos (the part an optimizer changes), for reports."""
    found = []
    for name, predictor in program.named_predictors():
        demos = list(demo_dicts(predictor.demos))
        found.append({"predictor": name, "instruction": predictor.signature.instructions, "demos": demos})
    return found


def render_program_markdown(program: dspy.Module, settings: ProgramSettings, title: str) -> str:
    """The program's instructions and demos as a reviewer reads them (Markdown), with one example prompt."""
    lines = [f"# {title}", ""]
    adapter = CompletionAdapter(settings.context_field)
    for entry in predictor_prompts(program):
        lines += [
            f"## Predictor `{entry['predictor']}`",
            "",
            "### Instruction",
            "",
            "> " + entry["instruction"].replace("\n", "\n> "),
            "",
        ]
        lines += [f"### Demos ({len(entry['demos'])})", ""]
        if not entry["demos"]:
            lines += ["(none: zero-shot)", ""]
        for position, demo in enumerate(entry["demos"], 1):
            kind = "bootstrapped" if demo.get("augmented") else "labeled"
            lines += [f"{position}. ({kind})"]
            for key, value in demo.items():
                if key in ("augmented",):
                    continue
                text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
                lines += [f"   - **{key}**: {text}"]
        lines.append("")
    predictor = next(iter(program.named_predictors()))[1]
    signature = getattr(predictor, "signature", None)
    if signature is not None:
        example = {name: f"<{name}>" for name in signature.input_fields}
        if settings.retrieve_k:
            example[settings.context_field] = [f"<passage {i}>" for i in range(1, min(settings.retrieve_k, 2) + 1)]
        if isinstance(program, SpecialistProgram):
            lines += [
                f"Answer mode: `{program.answer_mode}`"
                + (f" (retriever's ranking weighted {program.retrieval_weight:g})" if program.retrieval_weight else "")
                + f"; passages per question: {program.retrieve_k}.",
                "",
            ]
        prompt = adapter.format(signature, predictor.demos, example)[0]["content"]
        lines += ["## The prompt the model completes", "", "```text", prompt, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- context


@contextmanager
def program_context(lm: dspy.BaseLM, settings: ProgramSettings) -> Iterator[None]:
    """Run DSPy with `lm` and the completion adapter (thread-local; nothing global is changed)."""
    with dspy.context(lm=lm, adapter=CompletionAdapter(settings.context_field if settings.retrieve_k else None)):
        yield


# ---------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class LMTarget:
    """Where a program's completions come from: the slice of config a task needs to build its client.

    Attributes:
        kind: `endpoint` (an OpenAI-compatible server, the `cadre up` llama.cpp server by default) or
            `llama_cpp` (llama.cpp in this process, used to apply a LoRA adapter in GGUF form).
        model: model name (endpoint) or GGUF path (llama_cpp).
        base_url: endpoint URL (kind `endpoint`).
        api_key_env: environment variable holding the endpoint's key, if any.
        adapter_gguf: LoRA adapter applied on top of the base GGUF (kind `llama_cpp`).
        adapter_version: the registry version the adapter came from, for reports.
        n_threads: decode threads (kind `llama_cpp`).
        n_ctx: context window (kind `llama_cpp`).
        identity: what the cache keys on: the model and adapter that answer, not where they run.
        local_gguf: the GGUF the endpoint serves when it is the local llama.cpp server (scored answers run on it
            in process; kind `endpoint`).
    """

    kind: str
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    adapter_gguf: str | None = None
    adapter_version: str | None = None
    n_threads: int = 1
    n_ctx: int = 2048
    identity: str = ""
    local_gguf: str | None = None

    def describe(self) -> str:
        where = self.base_url if self.kind == "endpoint" else f"in-process llama.cpp ({Path(self.model).name})"
        adapter = f" + LoRA adapter v{self.adapter_version}" if self.adapter_gguf else ""
        return f"{where}{adapter}"


def lm_target(config: CadreConfig, adapter_gguf: Path | None = None, adapter_version: str | None = None) -> LMTarget:
    """The LM a specialist's program runs on.

    Without an adapter: the project's endpoint (`project.lm`: the llama.cpp server `cadre up` starts,
    or any OpenAI-compatible `api_base`). With the champion's LoRA adapter (GGUF, from the refresh
    flow): the packaged base GGUF in this process with the adapter applied, because the shared server
    serves the base model only and cannot switch adapters per request.

    Args:
        config: the validated pipelines file.
        adapter_gguf: a LoRA adapter in GGUF form to apply, or None.
        adapter_version: its registry version, for reports.
    """
    from cadre.runtime.base_model import ensure_gguf

    settings = config.project.lm
    if adapter_gguf is None:
        remote = f"@{settings.api_base}" if settings.api_base else ""
        return LMTarget(
            kind="endpoint",
            model=settings.model,
            base_url=settings.base_url,
            api_key_env=settings.api_key_env,
            identity=f"endpoint:{settings.model}{remote}",
            local_gguf=None if settings.api_base else str(ensure_gguf(config)),
        )

    return llama_cpp_target(ensure_gguf(config), adapter_gguf, adapter_version, settings.n_threads, settings.n_ctx)


def llama_cpp_target(
    gguf: str | Path, adapter_gguf: str | Path | None, adapter_version: str | None, n_threads: int, n_ctx: int
) -> LMTarget:
    """llama.cpp in this process on a base GGUF, with a LoRA adapter (GGUF) applied when one is given.

    Args:
        gguf: the base model's GGUF.
        adapter_gguf: the adapter to apply, or None for the bare base model.
        adapter_version: the adapter's registry version, for reports.
        n_threads: decode threads.
        n_ctx: context window.
    """
    return LMTarget(
        kind="llama_cpp",
        model=str(gguf),
        adapter_gguf=str(adapter_gguf) if adapter_gguf else None,
        adapter_version=adapter_version,
        n_threads=n_threads,
        n_ctx=n_ctx,
        identity=llama_cpp_identity(gguf, adapter_gguf),
    )


def build_client(target: LMTarget) -> CompletionClient:
    """The completion client of an `LMTarget`."""
    if target.kind == "endpoint":
        api_key = os.environ.get(target.api_key_env) if target.api_key_env else None
        return EndpointClient(target.base_url or "", target.model, api_key=api_key, local_gguf=target.local_gguf)
    return LlamaCppClient(
        Path(target.model),
        lora_path=Path(target.adapter_gguf) if target.adapter_gguf else None,
        n_threads=target.n_threads,
        n_ctx=target.n_ctx,
    )


__all__ = [
    "Budget",
    "BudgetExhausted",
    "CompletionAdapter",
    "CompletionLM",
    "IndexNotReady",
    "IndexTarget",
    "LMTarget",
    "LMUnreachable",
    "LMUsage",
    "Passage",
    "Retriever",
    "RunStopped",
    "SharedRetriever",
    "SpecialistProgram",
    "build_client",
    "llama_cpp_target",
    "lm_target",
    "load_program",
    "make_signature",
    "open_retriever",
    "predictor_prompts",
    "program_context",
    "program_fingerprint",
    "render_program_markdown",
    "save_program",
    "use_disk_cache",
]
