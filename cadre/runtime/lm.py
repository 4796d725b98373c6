"""Text-completion clients: the one narrow interface every part of Cadre generates through.

Two implementations of the `CompletionClient` protocol:

- `EndpointClient`: any OpenAI-compatible `/v1/completions` endpoint — the llama.cpp server `cadre up`
  starts, vLLM, Ollama, a hosted API. It sends `max_tokens` (llama.cpp ignores
  `max_completion_tokens`) and stop sequences.
- `LlamaCppClient`: llama.cpp in this process, on the GGUF base model with an optional LoRA adapter in
  GGUF form — how a candidate or champion adapter is run on CPU without restarting a server.

Both are completion (not chat) clients on purpose: the packaged model is a base model, prompted with
`cadre.runtime.prompt`.

When a program's answer is one of the retrieved documents' ids (`program.answer.mode`), `answer_from_candidates`
is the one rule every path applies (the DSPy program's LM, and the server through its engine, which calls the
same `candidate_grammar` / `score_continuations`):

- `constrained`: the completion is decoded under a llama.cpp GBNF grammar (`candidate_grammar`) whose
  alternatives are the candidate ids, so no other answer can be produced; `max_tokens` is raised to the longest
  id's length in bytes, so an answer is never cut inside an id.
- `score`: each candidate's completion (` A01.02` and the newline that ends it) is scored by the LM's
  log-likelihood after the prompt, and the best is the answer. In process (`LlamaCppClient`, the server's engine)
  the prompt is evaluated once and each candidate costs one forward pass per token of its completion; through an
  endpoint it is one `echo` + `logprobs` request per candidate (cheap on vLLM; llama-cpp-python's server builds
  log-probabilities over the whole prompt and vocabulary for it, seconds per candidate).
  With `retrieval_weight` w > 0 the retriever's ranking counts too (`pick_scored`): candidate i (0 = first hit)
  scores its log-likelihood − w·ln(1 + i). A base model alone ranks ICD candidates worse than the retriever's
  first hit; the weight, chosen on dev, lets the LM overrule the ranking only where it is confident.
  In process, a candidate stops being scored as soon as it cannot win (`rank_penalties`: its running log-likelihood
  only falls, token by token), so the answer is the one full scoring gives at a fraction of the forward passes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx


@dataclass(frozen=True)
class Completion:
    """One generated continuation and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class CompletionClient(Protocol):
    """Shape of anything that continues a prompt, optionally under a grammar, and scores given continuations."""

    name: str

    def complete(
        self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0, grammar: str | None = None
    ) -> Completion: ...

    def score(self, prompt: str, continuations: Sequence[str], penalties: Sequence[float] | None = None) -> list[float]:
        """The log-likelihood of each continuation after the prompt (sum over its tokens).

        With `penalties` (one per continuation, `rank_penalties`), a client may stop scoring a continuation once its
        log-likelihood minus its penalty cannot beat a continuation before it, and return `-inf` for it: the
        answer `pick_scored` takes is the same."""
        ...


def candidate_grammar(candidates: Sequence[str]) -> str:
    """A llama.cpp GBNF grammar whose only sentences are a space and one of the candidate ids.

    The prompt ends at the output label (`Code:`), so the answer the model writes is ` A01.02`; the grammar
    allows exactly that for each candidate and nothing else.
    """
    alternatives = " | ".join(_gbnf_literal(candidate) for candidate in dict.fromkeys(candidates))
    return f'root ::= " " ({alternatives})'


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def answer_from_candidates(
    client: CompletionClient,
    prompt: str,
    candidates: Sequence[str],
    *,
    mode: str,
    max_tokens: int,
    stop: list[str],
    temperature: float = 0.0,
    retrieval_weight: float = 0.0,
) -> Completion:
    """The answer among the candidate ids (best-ranked first), by `mode` (`constrained` or `score`, with the
    retriever's ranking weighted by `retrieval_weight`); see the module docstring.

    With no candidate (the index found nothing) the completion is empty: the case is unanswered, not invented.

    Raises:
        ValueError: an unknown mode.
    """
    started = time.perf_counter()
    candidates = list(dict.fromkeys(c for c in candidates if c))
    if not candidates:
        return Completion("", 0, 0, 0.0)
    if mode == "constrained":
        # Never cut inside an id (its prefix is no candidate): a token holds at least one byte, plus the space.
        room = max(max_tokens, 1 + max(len(candidate.encode()) for candidate in candidates))
        return client.complete(
            prompt, max_tokens=room, stop=stop, temperature=temperature, grammar=candidate_grammar(candidates)
        )
    if mode == "score":
        penalties = rank_penalties(len(candidates), retrieval_weight)
        scores = client.score(prompt, [answer_continuation(candidate, stop) for candidate in candidates], penalties)
        best = pick_scored(scores, retrieval_weight)
        return Completion(" " + candidates[best], 0, 0, time.perf_counter() - started)
    raise ValueError(f"unknown answer mode {mode!r}; expected constrained or score")


def rank_penalties(count: int, retrieval_weight: float = 0.0) -> list[float]:
    """What each of `count` candidates (best-ranked first) loses for its rank: `retrieval_weight × ln(1 + rank)`."""
    return [retrieval_weight * math.log1p(rank) for rank in range(count)]


def pick_scored(scores: Sequence[float], retrieval_weight: float = 0.0) -> int:
    """Index of the best candidate: log-likelihood minus `retrieval_weight × ln(1 + rank)`; ties go to the
    better-ranked candidate (candidates come best-ranked first)."""
    penalties = rank_penalties(len(scores), retrieval_weight)
    return max(range(len(scores)), key=lambda i: (scores[i] - penalties[i], -i))


def answer_continuation(candidate: str, stop: Sequence[str]) -> str:
    """What the model writes when it answers `candidate`: a space, the id, and the stop that ends the answer."""
    return f" {candidate}{stop[0] if stop else ''}"


def score_continuations(
    llama: Any, prompt: str, continuations: Sequence[str], penalties: Sequence[float] | None = None
) -> list[float]:
    """Log-likelihood of each continuation after the prompt on an in-process `llama_cpp.Llama` (caller holds it).

    The prompt is evaluated once; each continuation's tokens are then fed one at a time from the end of the prompt,
    and the log-probabilities of its tokens are summed. A continuation is tokenized together with the prompt, so its
    tokens are those the model would have written. Candidates often share their first tokens (`C31.1`, `C31.9`):
    the log-probabilities after a shared prefix are computed once, and the KV cache is cut back only to where the
    next continuation leaves the tokens already evaluated. Every token is still evaluated on the same tokens before
    it, one at a time, so the scores are those of scoring each continuation on its own.

    The prompt is evaluated by `evaluate_prompt`, which keeps its fixed part (instruction and demos) for the next call.

    With `penalties` (one per continuation, in rank order: `rank_penalties`), a continuation is scored only while it
    can still win: each token's log-probability is at most 0, so once its running sum minus its penalty is no
    better than the best continuation before it (which wins a tie), it is given up and scored `-inf`. The answer
    `pick_scored` takes is the one full scoring gives; each token given up saves a forward pass over the whole
    vocabulary, the cost of scoring (about 17 ms a token for Gemma 3 270M at one thread).
    """
    import numpy as np

    prompt_tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    evaluate_prompt(llama, prompt, prompt_tokens)
    after: dict[tuple[int, ...], Any] = {
        (): _log_softmax(np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)))
    }
    evaluated: list[int] = []  # the continuation tokens the KV cache holds after the prompt
    scores: list[float] = []
    best = -math.inf  # the best penalised score so far (pruning only)
    for number, continuation in enumerate(continuations):
        penalty = penalties[number] if penalties is not None else None
        joined = llama.tokenize((prompt + continuation).encode("utf-8"), add_bos=True, special=False)
        if joined[: len(prompt_tokens)] == prompt_tokens:
            tokens = joined[len(prompt_tokens) :]
        else:  # the boundary merged differently; score the continuation on its own
            tokens = llama.tokenize(continuation.encode("utf-8"), add_bos=False, special=False)
        if not tokens or (penalty is not None and -penalty <= best):
            scores.append(-math.inf)
            continue
        total = 0.0
        for position, token in enumerate(tokens):
            prefix = tuple(tokens[:position])
            if prefix not in after:
                shared = 0
                while shared < len(evaluated) and shared < position - 1 and evaluated[shared] == prefix[shared]:
                    shared += 1
                for index in range(shared, position):  # the prefix's tokens the cache does not hold yet
                    llama.n_tokens = len(prompt_tokens) + index
                    llama.eval([prefix[index]])
                    logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),))
                    after[prefix[: index + 1]] = _log_softmax(logits)
                evaluated = list(prefix)
            total += float(after[prefix][token])
            if penalty is not None and total - penalty <= best:
                total = -math.inf  # it cannot win: the rest of its tokens only lower it
                break
        scores.append(total)
        if penalty is not None and total != -math.inf:
            best = max(best, total - penalty)
    llama.n_tokens = len(prompt_tokens)
    return scores


_HELD_PREFIX = "_cadre_held_prefix"  # attribute of a `llama_cpp.Llama`: the fixed prompt part its KV cache holds


def evaluate_prompt(llama: Any, prompt: str, prompt_tokens: Sequence[int]) -> None:
    """Evaluate `prompt` (its `prompt_tokens`) on `llama` in two batches: its fixed part, the instruction and demos up
    to the last `---` separator (`cadre.runtime.prompt.SEPARATOR`; a value never holds one, its whitespace is
    collapsed), then the question. The fixed part's cache is kept: when the next prompt starts with the same fixed
    part on the same model and adapter, only its question is evaluated (the instruction is about a quarter of an
    ICD prompt; with demos, most of it).

    Where the prompt is cut depends on the prompt alone, and the fixed part is always evaluated as one batch from an
    empty cache, so a prompt's scores are the same whether its fixed part was kept or evaluated now. Anything else
    that evaluates on `llama` must call `forget_prompt(llama)` first (`LlamaCppClient.complete`, the server's
    engine when it generates or switches adapter).
    """
    from cadre.runtime.prompt import SEPARATOR

    fixed = 0
    cut = prompt.rfind(SEPARATOR)
    if cut >= 0:
        head = llama.tokenize(prompt[: cut + len(SEPARATOR)].encode("utf-8"), add_bos=True, special=False)
        limit = min(len(head), len(prompt_tokens) - 1)  # the question keeps at least the last token (its logits)
        while fixed < limit and head[fixed] == prompt_tokens[fixed]:
            fixed += 1
    held = tuple(prompt_tokens[:fixed])
    if fixed and getattr(llama, _HELD_PREFIX, None) == held:
        llama.n_tokens = fixed  # the question's batch cuts the cache back to here
    else:
        forget_prompt(llama)
        if fixed:
            llama.eval(prompt_tokens[:fixed])
            setattr(llama, _HELD_PREFIX, held)
    llama.eval(prompt_tokens[fixed:])


def forget_prompt(llama: Any) -> None:
    """Empty `llama`'s KV cache and forget the fixed prompt part `evaluate_prompt` kept (before evaluating anything
    else on it, or after switching its adapter)."""
    setattr(llama, _HELD_PREFIX, None)
    llama.reset()


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits.astype(np.float64) - float(logits.max())
    return shifted - math.log(float(np.exp(shifted).sum()))


def llama_cpp_identity(gguf: str | Path, adapter_gguf: str | Path | None = None) -> str:
    """Who answers when llama.cpp runs `gguf` (with a LoRA adapter): what completion caches key on.

    The base GGUF's file name and the first 16 hex digits of the adapter's sha256, so an answer cached for
    one adapter is never replayed for another, wherever the files live.
    """
    from cadre.runtime.base_model import file_sha256

    identity = f"llama.cpp:{Path(gguf).name}"
    return identity + (f"+lora:{file_sha256(Path(adapter_gguf))[:16]}" if adapter_gguf else "")


class LMUnavailable(RuntimeError):
    """The LM endpoint could not be reached after retries."""


class EndpointClient:
    """An OpenAI-compatible completions endpoint, with retries on connection errors and 5xx."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        local_gguf: str | Path | None = None,
    ):
        """Args:
        base_url: the endpoint (`…/v1`).
        model: the model name the endpoint serves.
        api_key: bearer token, if the endpoint needs one.
        timeout_s: per request.
        retries: retries on connection errors and 5xx.
        backoff_s: first retry delay (doubled each retry).
        local_gguf: the GGUF the endpoint serves, when it is the local llama.cpp server `cadre up` starts: `score`
            then runs on the same file in this process (llama-cpp-python's server answers `echo` + `logprobs` by
            building log-probabilities over the whole prompt and vocabulary, seconds to minutes per candidate).
        """
        self.base_url = base_url.rstrip("/")
        self.local_gguf = Path(local_gguf) if local_gguf else None
        self._scorer: LlamaCppClient | None = None
        self.model = model
        self.name = f"{model}@{self.base_url}"
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def complete(
        self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0, grammar: str | None = None
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
        }
        if grammar is not None:
            body["grammar"] = grammar  # llama.cpp's servers take a GBNF grammar; others reject the request
        data, seconds = self._post(body)
        usage = data.get("usage") or {}
        return Completion(
            text=data["choices"][0]["text"],
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
        )

    def score(self, prompt: str, continuations: Sequence[str], penalties: Sequence[float] | None = None) -> list[float]:
        """One `echo` + `logprobs` request per continuation: the sum of the log-probabilities of its tokens
        (those that start at or after the end of the prompt), every continuation in full; on the served GGUF in
        process when it is local (which gives up the continuations that cannot win, see `score_continuations`)."""
        if self.local_gguf is not None:
            if self._scorer is None:
                self._scorer = LlamaCppClient(self.local_gguf, name=self.name)
            return self._scorer.score(prompt, continuations, penalties)
        scores = []
        for continuation in continuations:
            body = {
                "model": self.model,
                "prompt": prompt + continuation,
                "max_tokens": 1,
                "echo": True,
                "logprobs": 0,
                "temperature": 0.0,
            }
            data, _ = self._post(body)
            logprobs = data["choices"][0].get("logprobs") or {}
            offsets, values = logprobs.get("text_offset") or [], logprobs.get("token_logprobs") or []
            echoed = len(values) - 1  # the one generated token is not part of the continuation
            scores.append(
                sum(float(v) for o, v in zip(offsets[:echoed], values[:echoed], strict=False) if o >= len(prompt))
            )
        return scores

    def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                response = self._http.post(f"{self.base_url}/completions", json=body)
                if response.status_code < 500:
                    response.raise_for_status()
                    return response.json(), time.perf_counter() - started
                last_error = httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text[:200]}", request=response.request, response=response
                )
            except (httpx.TransportError, httpx.TimeoutException) as error:
                last_error = error
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise LMUnavailable(f"LM endpoint {self.base_url} failed after {self.retries + 1} attempts: {last_error}")


_QUIET_LOAD = threading.Lock()


def load_llama(**options: Any) -> Any:
    """A quiet `llama_cpp.Llama(**options)` (`verbose=False`), one load at a time in the process.

    llama-cpp-python keeps a quiet load quiet by pointing the process's stdout and stderr (fd 1 and 2, `sys.stdout`
    and `sys.stderr`) at /dev/null and back. Two loads at once in two threads restore each other's /dev/null, and the
    process prints nothing more (`cadre demo` lost its summary that way when two edge exports overlapped).
    """
    from llama_cpp import Llama

    with _QUIET_LOAD:
        return Llama(**options, verbose=False)


class LlamaCppClient:
    """llama.cpp in-process on a GGUF model, optionally with a LoRA adapter (GGUF) applied."""

    def __init__(
        self,
        model_path: Path,
        lora_path: Path | None = None,
        n_threads: int = 1,
        n_ctx: int = 2048,
        name: str | None = None,
    ):
        self.name = name or (
            f"{Path(model_path).stem}+{Path(lora_path).parent.name}" if lora_path else Path(model_path).stem
        )
        self._llama = load_llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_ctx=n_ctx,
            seed=0,
        )
        self._lock = threading.Lock()  # a Llama context is not safe to share between threads

    def complete(
        self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0, grammar: str | None = None
    ) -> Completion:
        started = time.perf_counter()
        with self._lock:
            forget_prompt(self._llama)  # no cross-request prefix reuse: identical prompts give identical answers
            data = self._llama.create_completion(
                prompt, max_tokens=max_tokens, stop=stop, temperature=temperature, grammar=llama_grammar(grammar)
            )
        usage = data.get("usage") or {}
        return Completion(
            text=data["choices"][0]["text"],
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=time.perf_counter() - started,
        )

    def score(self, prompt: str, continuations: Sequence[str], penalties: Sequence[float] | None = None) -> list[float]:
        """Log-likelihood of each continuation after the prompt (`score_continuations`)."""
        with self._lock:
            return score_continuations(self._llama, prompt, continuations, penalties)


def llama_grammar(grammar: str | None) -> Any:
    """A GBNF grammar as llama-cpp-python takes it (None stays None)."""
    if grammar is None:
        return None
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(grammar, verbose=False)
