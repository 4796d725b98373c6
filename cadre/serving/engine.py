"""One GGUF base model in memory serving several LoRA adapters: llama.cpp with runtime adapter switching.

Each of a small pool of llama.cpp contexts (`contexts`, default 1) holds the base model memory-mapped
and every loaded adapter; a request takes a free context, sets its specialist's adapter on it with
`llama_set_adapters_lora` (or none, for the base model), resets the KV cache and generates. Adapters
are small (7.6 MB for r=8 on the 270M model) and switching costs well under a millisecond, so the
base weights are in memory once however many specialists and adapter versions are served.

Why not one `Llama(lora_path=...)` per adapter: llama-cpp-python turns mmap off whenever `lora_path`
is given (`use_mmap = use_mmap and lora_path is None`), so every such context holds a private copy
of the base weights (+~290 MB anonymous memory each, measured). Contexts made *without* `lora_path`
share the base file through the page cache; that is how the pool's contexts are made, and why a
second context costs only its KV cache and compute buffers. `bench/serve.py --memory` measures the
three layouts; three r=8 adapters, n_ctx 2048, one fresh process each:

    (a)  Llama(lora_path) per adapter           RSS 1046 MB, of it anonymous (private) 1021 MB
    (a') a context per adapter, mmapped base    RSS 1084 MB, anonymous 353 MB (base pages shared)
    (b)  one context, adapters switched         RSS  420 MB, anonymous 159 MB   <- this engine

Adapters are reference-counted (`AdapterLease`): the team holds one lease per served adapter, every
request holds one while it generates, and an adapter replaced by a newer champion is freed once the
last request using it has finished.

Generated tokens are identical to llama.cpp with `lora_path` (checked token for token), so what the
server answers is what the flows evaluated with `cadre.runtime.lm.LlamaCppClient`.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadre.runtime.lm import Completion, forget_prompt, llama_grammar, load_llama, score_continuations


class EngineError(RuntimeError):
    """The engine could not load a model or an adapter; the message says which and why."""


class GenerationCancelled(Exception):
    """The caller stopped a generation (a streaming client went away)."""


@dataclass(frozen=True)
class Generation:
    """One completion and what it cost.

    Attributes:
        text: the completion (stop sequence excluded).
        prompt_tokens: tokens of the prompt (BOS included).
        completion_tokens: tokens generated.
        finish_reason: `stop` (a stop sequence or end of text) or `length` (max_tokens reached).
        queue_seconds: time spent waiting for a free context.
        seconds: time spent generating.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queue_seconds: float
    seconds: float


class _Context:
    """One llama.cpp context on the memory-mapped base, with its own handles of the loaded adapters."""

    def __init__(self, model_path: Path, n_threads: int, n_ctx: int):
        self.llama = load_llama(
            model_path=str(model_path),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_ctx=n_ctx,
            seed=0,
            use_mmap=True,
        )
        self.adapters: dict[str, Any] = {}
        self.active: str | None = None

    def load(self, key: str, path: Path) -> None:
        import llama_cpp

        handle = llama_cpp.llama_adapter_lora_init(self.llama._model.model, str(path).encode("utf-8"))
        if not handle:
            raise EngineError(
                f"llama.cpp could not load the LoRA adapter {path} (is it a LoRA GGUF made for this base model?)"
            )
        self.adapters[key] = handle

    def use(self, key: str | None) -> None:
        import llama_cpp

        if key == self.active:
            return
        if key is None:
            status = llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[key])
            scales = (ctypes.c_float * 1)(1.0)
            status = llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, handles, 1, scales)
        if status != 0:
            raise EngineError(f"llama.cpp refused to set adapter {key!r} (status {status})")
        self.active = key
        forget_prompt(self.llama)  # what the cache holds was computed with the previous adapter

    def free(self, key: str) -> None:
        import llama_cpp

        if self.active == key:
            self.use(None)
        handle = self.adapters.pop(key, None)
        if handle:
            llama_cpp.llama_adapter_lora_free(handle)


class AdapterLease:
    """A hold on a loaded adapter; the adapter is freed when the last lease is released."""

    def __init__(self, engine: LoraEngine, key: str | None):
        self._engine = engine
        self.key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._release(self.key)

    def share(self) -> AdapterLease:
        """Another lease on the same adapter (a request takes one for as long as it generates)."""
        return self._engine._lease(self.key)


class LoraEngine:
    """llama.cpp in this process: one base model, a pool of contexts, LoRA adapters switched per request."""

    def __init__(self, model_path: Path, *, contexts: int = 1, n_threads: int = 1, n_ctx: int = 2048):
        """Load the base model into `contexts` llama.cpp contexts (memory-mapped: the weights are shared).

        Args:
            model_path: the base model GGUF.
            contexts: requests generated at the same time (each context has its own KV cache).
            n_threads: decode threads per context (1 is fastest on a shared 2-core machine; 2 threads collapse under load).
            n_ctx: context window in tokens (prompt + completion).
        """
        if contexts < 1:
            raise ValueError("contexts must be at least 1")
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self._contexts = [_Context(self.model_path, n_threads, n_ctx) for _ in range(contexts)]
        self._free: queue.Queue[_Context] = queue.Queue()
        for context in self._contexts:
            self._free.put(context)
        self._refs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._exclusive = threading.Lock()

    @property
    def contexts(self) -> int:
        return len(self._contexts)

    def adapters_loaded(self) -> list[str]:
        """Keys of the adapters in memory (their file paths)."""
        with self._lock:
            return sorted(self._refs)

    # -- adapters ---------------------------------------------------------------------------

    def load_adapter(self, path: Path | None) -> AdapterLease:
        """Load a LoRA adapter (GGUF) into every context, or take another lease if it is loaded; None: the base model.

        Loading waits for each context to finish its current generation, so it never runs beside one.

        Raises:
            EngineError: llama.cpp could not load it.
        """
        if path is None:
            return AdapterLease(self, None)
        key = str(Path(path).resolve())
        with self._exclusive:
            with self._lock:
                if key in self._refs:
                    self._refs[key] += 1
                    return AdapterLease(self, key)
            with self._every_context() as contexts:
                loaded: list[_Context] = []
                try:
                    for context in contexts:
                        context.load(key, Path(key))
                        loaded.append(context)
                except BaseException:
                    for context in loaded:
                        context.free(key)
                    raise
            with self._lock:
                self._refs[key] = 1
        return AdapterLease(self, key)

    def _lease(self, key: str | None) -> AdapterLease:
        if key is not None:
            with self._lock:
                if key not in self._refs:
                    raise EngineError(f"adapter {key} is no longer loaded")
                self._refs[key] += 1
        return AdapterLease(self, key)

    def _release(self, key: str | None) -> None:
        if key is None:
            return
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] > 0:
                return
        # Freeing waits for every context; the request whose lease was last must not wait for that.
        threading.Thread(target=self._free_if_unused, args=(key,), name="cadre-free-adapter", daemon=True).start()

    def _free_if_unused(self, key: str) -> None:
        with self._exclusive:
            with self._lock:
                if self._refs.get(key, 0) > 0:
                    return  # leased again (re-promoted) before it could be freed
                self._refs.pop(key, None)
            with self._every_context() as contexts:
                for context in contexts:
                    context.free(key)

    @contextmanager
    def _every_context(self) -> Iterator[list[_Context]]:
        """Hold every context, waiting for running generations to end (callers hold `_exclusive`, so two never deadlock)."""
        taken = [self._free.get() for _ in self._contexts]
        try:
            yield taken
        finally:
            for context in taken:
                self._free.put(context)

    # -- generation -------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt as the model sees it (BOS included)."""
        return self._contexts[0].llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    @contextmanager
    def _context(self) -> Iterator[tuple[_Context, float]]:
        started = time.perf_counter()
        context = self._free.get()
        try:
            yield context, time.perf_counter() - started
        finally:
            self._free.put(context)

    def generate(
        self,
        prompt: str,
        *,
        adapter: AdapterLease,
        max_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        prompt_tokens: int | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """Complete a prompt with the adapter applied, calling `on_text` with each piece as it is generated.

        Args:
            prompt: the full prompt.
            adapter: a lease on the adapter to apply (kept by the caller until this returns).
            max_tokens: most tokens to generate.
            stop: stop sequences (excluded from the text).
            temperature: 0 for greedy decoding (what the evaluations use).
            on_text: receives each piece of text as soon as it is decoded.
            cancelled: polled between tokens; True stops the generation with `GenerationCancelled`.
            prompt_tokens: the prompt's token count, if the caller already counted it.
            grammar: a GBNF grammar the completion must follow (`cadre.runtime.lm.candidate_grammar`), or None.

        Raises:
            GenerationCancelled: `cancelled()` returned True.
        """
        prompt_tokens = prompt_tokens if prompt_tokens is not None else len(self.tokenize(prompt))
        pieces: list[str] = []
        finish_reason = "stop"
        with self._context() as (context, waited):
            started = time.perf_counter()
            context.use(adapter.key)
            # A fresh KV cache per request: the previous request may have run with another adapter.
            forget_prompt(context.llama)
            stream = context.llama.create_completion(
                prompt,
                max_tokens=max_tokens,
                stop=stop,
                temperature=temperature,
                stream=True,
                grammar=llama_grammar(grammar),
            )
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        pieces.append(choice["text"])
                        if on_text is not None:
                            on_text(choice["text"])
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    if cancelled is not None and cancelled():
                        raise GenerationCancelled()
            finally:
                stream.close()
            # The last sampled token is never evaluated, so the context holds one token fewer than was generated.
            generated = max(0, context.llama.n_tokens - prompt_tokens + 1)
            seconds = time.perf_counter() - started
        return Generation(
            text="".join(pieces),
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            finish_reason=finish_reason,
            queue_seconds=waited,
            seconds=seconds,
        )

    def score(
        self,
        prompt: str,
        continuations: list[str],
        *,
        adapter: AdapterLease,
        penalties: Sequence[float] | None = None,
    ) -> list[float]:
        """Log-likelihood of each continuation after the prompt with the adapter applied (`score_continuations`,
        which gives up those that cannot win when given their `penalties`)."""
        with self._context() as (context, _):
            context.use(adapter.key)
            return score_continuations(context.llama, prompt, continuations, penalties)

    def client(self, adapter: AdapterLease) -> EngineClient:
        """This engine with one adapter as a `cadre.runtime.lm.CompletionClient`, so the server answers from
        candidates with the same `answer_from_candidates` rule the flows evaluate with."""
        return EngineClient(self, adapter)

    def close(self) -> None:
        """Free every adapter and context."""
        for context in self._contexts:
            for key in list(context.adapters):
                context.free(key)
            context.llama.close()


@dataclass(frozen=True)
class EngineClient:
    """A `CompletionClient` over the engine with one adapter (the caller holds the lease while it is used)."""

    engine: LoraEngine
    adapter: AdapterLease
    name: str = "cadre-serve"

    def complete(
        self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0, grammar: str | None = None
    ) -> Completion:
        generation = self.engine.generate(
            prompt, adapter=self.adapter, max_tokens=max_tokens, stop=stop, temperature=temperature, grammar=grammar
        )
        return Completion(generation.text, generation.prompt_tokens, generation.completion_tokens, generation.seconds)

    def score(self, prompt: str, continuations: Sequence[str], penalties: Sequence[float] | None = None) -> list[float]:
        return self.engine.score(prompt, list(continuations), adapter=self.adapter, penalties=penalties)
