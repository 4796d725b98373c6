"""Text-completion clients: the one narrow interface every part of Cadre generates through.

Two implementations of the `CompletionClient` protocol:

- `EndpointClient`: any OpenAI-compatible `/v1/completions` endpoint — the llama.cpp server `cadre up`
  starts, vLLM, Ollama, a hosted API. It sends `max_tokens` (llama.cpp ignores
  `max_completion_tokens`) and stop sequences.
- `LlamaCppClient`: llama.cpp in this process, on the GGUF base model with an optional LoRA adapter in
  GGUF form — how a candidate or champion adapter is run on CPU without restarting a server.

Both are completion (not chat) clients on purpose: the packaged model is a base model, prompted with
`cadre.runtime.prompt`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx


@dataclass(frozen=True)
class Completion:
    """One generated continuation and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class CompletionClient(Protocol):
    """Shape of anything that continues a prompt."""

    name: str

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0) -> Completion: ...


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
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{model}@{self.base_url}"
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0) -> Completion:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
        }
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                response = self._http.post(f"{self.base_url}/completions", json=body)
                if response.status_code < 500:
                    response.raise_for_status()
                    data = response.json()
                    usage = data.get("usage") or {}
                    return Completion(
                        text=data["choices"][0]["text"],
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        seconds=time.perf_counter() - started,
                    )
                last_error = httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text[:200]}", request=response.request, response=response
                )
            except (httpx.TransportError, httpx.TimeoutException) as error:
                last_error = error
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise LMUnavailable(f"LM endpoint {self.base_url} failed after {self.retries + 1} attempts: {last_error}")


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
        from llama_cpp import Llama

        self.name = name or (
            f"{Path(model_path).stem}+{Path(lora_path).parent.name}" if lora_path else Path(model_path).stem
        )
        self._llama = Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_ctx=n_ctx,
            verbose=False,
            seed=0,
        )
        self._lock = threading.Lock()  # a Llama context is not safe to share between threads

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float = 0.0) -> Completion:
        started = time.perf_counter()
        with self._lock:
            self._llama.reset()  # no cross-request prefix reuse: identical prompts give identical answers
            data = self._llama.create_completion(prompt, max_tokens=max_tokens, stop=stop, temperature=temperature)
        usage = data.get("usage") or {}
        return Completion(
            text=data["choices"][0]["text"],
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=time.perf_counter() - started,
        )
