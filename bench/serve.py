"""Benchmark of `cadre serve` with a team of three adapters on one base model, against bare llama.cpp.

In one run, on loopback:

1. A throwaway project: three retrieval-free specialists answering free-form questions (so decoding and not
   retrieval dominates), each with its own random LoRA adapter registered and promoted in the project's own
   MLflow (`cadre up --only mlflow`); `cadre serve` started as a subprocess holds one base model and the three
   adapters.
2. Sequential, one adapter: the same prompts one at a time through the server to the first specialist, then with
   bare llama.cpp in this process (`cadre.runtime.lm.LlamaCppClient`, same GGUF, the same adapter, same threads,
   the exact prompts the server rendered, read back from its feedback store). Tokens/s side by side, and their ratio.
3. Adapter swap cost: one-token answers sent to the same specialist, then rotating among the three (every request
   switches adapter); the difference in median latency is what a switch costs through the server. Bare llama.cpp
   switching the same adapters on one context (`llama_set_adapters_lora`) is timed beside it.
4. Resident memory of the server after serving one adapter, then after all three (one base model, three adapters).
5. Concurrent: N clients spread over the three specialists for a fixed time (and at most a fixed number of
   requests): requests/s, generated tokens/s, p50/p95 latency, errors.
6. With `--memory`: resident memory (RSS and PSS) of the three ways to serve three LoRA adapters on
   one base model, each measured in a fresh process (see `cadre.serving.engine`).

Everything it starts it stops again. Run:

    .venv/bin/python bench/serve.py [--clients 4] [--seconds 20] [--max-requests 400] [--contexts 1] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadre.config import load_config
from cadre.platform.env import OFFLINE_ENV

console = Console(width=120)

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "What is water made of?",
    "Why do leaves change colour in autumn?",
    "What is the tallest mountain in the world?",
    "What does a thermometer measure?",
    "What is the fastest land animal?",
    "What language is spoken in Brazil?",
    "What is the freezing point of water?",
    "What planet is known as the red planet?",
    "What is the main ingredient of bread?",
    "How many days are in a leap year?",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TEAM = ("geography", "science", "literature")
"""The bench's specialists: the same retrieval-free program, each with its own random LoRA adapter."""


def write_project(folder: Path, max_tokens: int) -> Path:
    (folder / "suite").mkdir(parents=True, exist_ok=True)
    (folder / "suite" / "test.jsonl").write_text(
        '{"id": "q1", "question": "What is the capital of France?", "answer": "Paris"}\n'
    )
    models = Path(os.environ.get("CADRE_MODELS_DIR", ROOT / ".cadre" / "models"))
    team = "".join(
        f"""
          - name: {name}
            description: Answers {name} questions in one sentence.
            program:
              instruction: Answer the question in one full sentence.
              inputs: [{{name: question}}]
              outputs: [{{name: answer}}]
              retrieve_k: 0
              max_tokens: {max_tokens}
            evaluation: {{suite: suite}}"""
        for name in TEAM
    )
    (folder / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: servebench
          state_dir: state
          mlflow: {{port: {_free_port()}}}
          prefect: {{port: {_free_port()}}}
          lm: {{port: {_free_port()}, n_threads: 1}}
        specialists:""")
        + team
        + "\n"
    )
    os.environ.setdefault("CADRE_MODELS_DIR", str(models))
    return folder / "pipelines.yaml"


def random_adapters(config_path: Path, count: int) -> list[Path]:
    """`count` random (non-zero) LoRA adapters of the base model, exported to GGUF."""
    import torch

    from cadre.runtime.base_model import ensure_hf_model
    from cadre.tuning.adapter_export import random_adapter

    hf = ensure_hf_model(load_config(config_path))
    torch.set_num_threads(1)
    # Small random weights on every linear layer: a real adapter's size and cost, answers still readable text. The
    # converter is the one `setup.sh` vendored under the checkout's `.cadre`.
    return [
        random_adapter(
            hf,
            config_path.parent / f"export{seed}",
            ROOT / ".cadre",
            seed,
            rank=8,
            target_modules="all-linear",
            scale=0.05,
        ).gguf
        for seed in range(count)
    ]


def promote_adapters(config_path: Path, adapters: list[Path]) -> None:
    """Log each adapter to a run, register it as its specialist's adapter version and make it the champion."""
    from mlflow import MlflowClient

    from cadre.registry.versions import promote, register_candidate

    config = load_config(config_path)
    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.create_experiment("servebench")
    for name, gguf in zip(TEAM, adapters, strict=True):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(gguf.parent), "adapter")
        client.set_terminated(run.info.run_id)
        version = register_candidate(
            client,
            project=config.project.name,
            specialist=name,
            kind="adapter",
            run_id=run.info.run_id,
            artifact_path="adapter",
            lineage={"base_model": "gemma3-270m"},
            actor="bench",
        )
        promote(
            client,
            project=config.project.name,
            specialist=name,
            kind="adapter",
            version=version.version,
            actor="bench",
            force=True,
            reason="the serving benchmark's random adapter",
        )


def start_server(config_path: Path, port: int, contexts: int, threads: int, max_in_flight: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))} | OFFLINE_ENV
    log = (config_path.parent / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cadre.cli",
            "serve",
            "-c",
            str(config_path),
            "--port",
            str(port),
            "--contexts",
            str(contexts),
            "--threads",
            str(threads),
            "--no-route",
            "--max-in-flight",
            str(max_in_flight),
            "--poll-interval",
            "60",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=config_path.parent,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"cadre serve exited: {(config_path.parent / 'serve.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("cadre serve did not become ready within 300 s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def ask(client: httpx.Client, url: str, model: str, question: str, max_tokens: int) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]},
    )
    seconds = time.perf_counter() - started
    return seconds, (response.json() if response.status_code == 200 else {"status": response.status_code})


def sequential(url: str, models: list[str], max_tokens: int) -> list[tuple[float, dict]]:
    """Every question once, one at a time, request i to `models[i % len(models)]` (after one warm-up each)."""
    with httpx.Client(timeout=300) as client:
        for model in models:
            ask(client, url, model, QUESTIONS[0], max_tokens)  # warm-up: loads the adapter
        return [ask(client, url, models[i % len(models)], q, max_tokens) for i, q in enumerate(QUESTIONS)]


def server_rss_mb(process: subprocess.Popen) -> float:
    """Resident memory of the server's process group (the server and anything it started), in MB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().split(")")[-1].split()
                if int(stat[2]) != process.pid:  # the process group id
                    continue
                status = (entry / "status").read_text()
            except (OSError, ValueError, IndexError):
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def _p95(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")


def concurrent(url: str, clients: int, seconds: float, max_requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    sent = [0]

    def client_loop(offset: int) -> None:
        with httpx.Client(timeout=300) as client:
            position = offset
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                    model = TEAM[sent[0] % len(TEAM)]
                latency, body = ask(client, url, model, QUESTIONS[position % len(QUESTIONS)], max_tokens)
                position += 1
                with lock:
                    if "usage" in body:
                        latencies.append(latency)
                        tokens.append(body["usage"]["completion_tokens"])
                    else:
                        errors.append(str(body.get("status")))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan"),
    }


def bare(
    config_path: Path, responses: list[dict], max_tokens: int, threads: int, adapter: Path
) -> list[tuple[float, int]]:
    """The exact prompts the server rendered, generated by llama.cpp in this process (same GGUF and adapter,
    threads, stop)."""
    from cadre.feedback.store import open_store, store_url_for
    from cadre.runtime.base_model import ensure_gguf
    from cadre.runtime.lm import LlamaCppClient

    config = load_config(config_path)
    store = open_store(store_url_for(config, TEAM[0]))
    prompts = [store.get_response(body["id"]).prompt for body in responses]
    client = LlamaCppClient(ensure_gguf(config), lora_path=adapter, n_threads=threads)
    client.complete(prompts[0], max_tokens=max_tokens, stop=["\n"])  # warm-up
    timed = []
    for prompt in prompts:
        completion = client.complete(prompt, max_tokens=max_tokens, stop=["\n"])
        timed.append((completion.seconds, completion.completion_tokens))
    return timed


BARE_SWITCH_PROBE = r"""
import ctypes, json, statistics, sys, time
import llama_cpp
from llama_cpp import Llama
base, adapters, threads = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
llm = Llama(model_path=base, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
handles = [llama_cpp.llama_adapter_lora_init(llm._model.model, p.encode()) for p in adapters]
def use(handle):
    llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle), 1, (ctypes.c_float * 1)(1.0))
tokens = llm.tokenize(b"Question: What is the capital of France?\nAnswer:")
def one_token(handle):
    started = time.perf_counter()
    if handle is not None:
        use(handle)
    llm.reset()
    llm.eval(tokens)
    return time.perf_counter() - started
use(handles[0]); one_token(None)
same = [one_token(None) for _ in range(30)]
rotating = [one_token(handles[i % len(handles)]) for i in range(1, 31)]
print(json.dumps({"same_ms": 1000 * statistics.median(same), "rotating_ms": 1000 * statistics.median(rotating)}))
"""


def bare_switch(config_path: Path, adapters: list[Path], threads: int) -> dict:
    from cadre.runtime.base_model import ensure_gguf

    done = subprocess.run(
        [sys.executable, "-c", BARE_SWITCH_PROBE, str(ensure_gguf(load_config(config_path))),
         ",".join(map(str, adapters)), str(threads)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


MEMORY_PROBE = r"""
import ctypes, json, sys, time
import llama_cpp
from llama_cpp import Llama
layout, base, adapters, n_ctx = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
PROMPT = "Question: What is the capital of France?\nAnswer:"
def rollup():
    found = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if parts[0].rstrip(":") in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            found[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return found
def answer(llm):
    llm.reset()
    return llm.create_completion(PROMPT, max_tokens=8, stop=["\n"], temperature=0.0)["choices"][0]["text"]
before = rollup()
texts = []
if layout == "lora_path":
    for path in adapters:
        llm = Llama(model_path=base, lora_path=path, n_ctx=n_ctx, n_threads=1, verbose=False); texts.append(answer(llm))
        globals().setdefault("keep", []).append(llm)
elif layout == "context_per_adapter":
    for path in adapters:
        llm = Llama(model_path=base, n_ctx=n_ctx, n_threads=1, verbose=False)
        handle = llama_cpp.llama_adapter_lora_init(llm._model.model, path.encode())
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle), 1, (ctypes.c_float * 1)(1.0))
        texts.append(answer(llm)); globals().setdefault("keep", []).append((llm, handle))
else:
    llm = Llama(model_path=base, n_ctx=n_ctx, n_threads=1, verbose=False)
    handles = [llama_cpp.llama_adapter_lora_init(llm._model.model, p.encode()) for p in adapters]
    for handle in handles:
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle), 1, (ctypes.c_float * 1)(1.0))
        texts.append(answer(llm))
after = rollup()
print(json.dumps({"before": before, "after": after, "texts": texts}))
"""


def memory(config_path: Path, adapters: list[Path], n_ctx: int) -> list[tuple[str, dict]]:
    """RSS/PSS of three layouts serving the three adapters, each in a fresh process."""
    from cadre.runtime.base_model import ensure_gguf

    base = ensure_gguf(load_config(config_path))
    rows = []
    for layout in ("lora_path", "context_per_adapter", "switching"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, layout, str(base), ",".join(map(str, adapters)), str(n_ctx)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        rows.append((layout, json.loads(done.stdout.strip().splitlines()[-1])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="duration of the concurrent phase (default: %(default)s)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=400, help="most requests in the concurrent phase (default: %(default)s)"
    )
    parser.add_argument(
        "--contexts", type=int, default=1, help="llama.cpp contexts of the server (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="decode threads per context, and for bare llama.cpp (default: %(default)s)",
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer at most (default: %(default)s)")
    parser.add_argument("--memory", action="store_true", help="also measure the memory of three adapter layouts")
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)

    from cadre.platform.stack import Stack

    with tempfile.TemporaryDirectory(prefix="cadre-serve-bench-") as folder:
        config_path = write_project(Path(folder), args.max_tokens)
        config = load_config(config_path)
        stack = Stack(config)
        quiet = Console(stderr=True, quiet=True)
        started = time.perf_counter()
        adapters = random_adapters(config_path, len(TEAM))
        stack.up(services=["mlflow"], console=quiet)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = None
        try:
            promote_adapters(config_path, adapters)
            server = start_server(
                config_path, port, args.contexts, args.threads, max_in_flight=max(8, args.clients * 2)
            )
            console.print(
                f"three adapters made and promoted, MLflow and cadre serve ready in "
                f"{time.perf_counter() - started:.0f} s; {args.contexts} context(s), {args.threads} thread(s) each"
            )
            rss_base = server_rss_mb(server)
            served = sequential(url, [TEAM[0]], args.max_tokens)
            rss_one = server_rss_mb(server)
            one_token_same = sequential(url, [TEAM[0]], 1)
            one_token_rotating = sequential(url, list(TEAM), 1)
            rss_three = server_rss_mb(server)
            health = httpx.get(f"{url}/health", timeout=10).json()
            load = concurrent(url, args.clients, args.seconds, args.max_requests, args.max_tokens)
        finally:
            if server is not None:
                stop_server(server)
            stack.down(console=quiet)
        bodies = [body for _, body in served if "usage" in body]
        baseline = bare(config_path, bodies, args.max_tokens, args.threads, adapters[0])
        switch = bare_switch(config_path, adapters, args.threads)
        layouts = memory(config_path, adapters, 2048) if args.memory else []

    server_tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    server_seconds = sum(seconds for seconds, body in served if "usage" in body)
    bare_tokens, bare_seconds = sum(t for _, t in baseline), sum(s for s, _ in baseline)
    server_rate, bare_rate = server_tokens / server_seconds, bare_tokens / bare_seconds
    table = Table(title=f"One request at a time, one adapter: {len(bodies)} prompts, same GGUF, adapter and threads")
    for column in ("", "generated tokens", "seconds", "tokens/s", "mean latency ms", "p95 latency ms"):
        table.add_column(column, justify="right")
    table.add_row(
        "through cadre serve (HTTP, loopback)",
        str(server_tokens),
        f"{server_seconds:.2f}",
        f"{server_rate:.1f}",
        f"{1000 * server_seconds / len(bodies):.0f}",
        f"{_p95([seconds for seconds, body in served if 'usage' in body]):.0f}",
    )
    table.add_row(
        "bare llama.cpp (in process)",
        str(bare_tokens),
        f"{bare_seconds:.2f}",
        f"{bare_rate:.1f}",
        f"{1000 * bare_seconds / len(baseline):.0f}",
        f"{_p95([seconds for seconds, _ in baseline]):.0f}",
    )
    table.add_row("[bold]server / bare[/bold]", "", "", f"[bold]{server_rate / bare_rate:.2f}[/bold]", "", "")
    console.print(table)

    same_ms = 1000 * statistics.median(seconds for seconds, _ in one_token_same)
    rotating_ms = 1000 * statistics.median(seconds for seconds, _ in one_token_rotating)
    table = Table(title="Adapter swap: median latency of a one-token answer, same adapter vs a new one each request")
    for column in ("", "same adapter ms", "switching every request ms", "cost of a switch ms"):
        table.add_column(column, justify="right")
    table.add_row(
        "through cadre serve", f"{same_ms:.1f}", f"{rotating_ms:.1f}", f"[bold]{rotating_ms - same_ms:+.1f}[/bold]"
    )
    table.add_row(
        "bare llama.cpp (llama_set_adapters_lora)",
        f"{switch['same_ms']:.1f}",
        f"{switch['rotating_ms']:.1f}",
        f"{switch['rotating_ms'] - switch['same_ms']:+.1f}",
    )
    console.print(table)

    engines = health.get("engines", [])
    table = Table(title="Resident memory of cadre serve (its process group), one base model")
    for column in ("when", "adapters loaded", "RSS MB"):
        table.add_column(column, justify="right")
    table.add_row("started, before any request", "0", f"{rss_base:.0f}")
    table.add_row("after answering with one adapter", "1", f"{rss_one:.0f}")
    table.add_row(
        "after answering with all three",
        str(sum(e.get("adapters_loaded", 0) for e in engines)),
        f"{rss_three:.0f}",
    )
    table.add_row("[bold]3 adapters − 1 adapter[/bold]", "", f"[bold]{rss_three - rss_one:+.0f}[/bold]")
    console.print(table)

    table = Table(
        title=f"{args.clients} concurrent clients over the three specialists for {load['wall_s']:.0f} s "
        f"(at most {args.max_requests} requests)"
    )
    for column in ("requests", "errors", "requests/s", "generated tokens/s", "p50 latency ms", "p95 latency ms"):
        table.add_column(column, justify="right")
    colour = "green" if not load["errors"] else "red"
    table.add_row(
        str(load["requests"]),
        f"[{colour}]{len(load['errors'])}[/{colour}]",
        f"{load['requests_per_s']:.2f}",
        f"{load['tokens_per_s']:.1f}",
        f"{load['p50_ms']:.0f}",
        f"{load['p95_ms']:.0f}",
    )
    console.print(table)

    if layouts:
        table = Table(title="Memory of three LoRA adapters on one base model (fresh process each, n_ctx 2048)")
        for column in ("layout", "RSS MB", "PSS MB", "PSS anonymous MB", "PSS file MB"):
            table.add_column(column, justify="right")
        names = {
            "lora_path": "(a) Llama(lora_path) per adapter (mmap off)",
            "context_per_adapter": "(a') context per adapter, mmapped base",
            "switching": "(b) one context, adapters switched per request",
        }
        for layout, measured in layouts:
            after = measured["after"]
            table.add_row(
                names[layout],
                f"{after['Rss']:.0f}",
                f"{after['Pss']:.0f}",
                f"{after['Pss_Anon']:.0f}",
                f"{after['Pss_File']:.0f}",
            )
        console.print(table)
    return 0 if not load["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
