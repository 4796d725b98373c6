"""Soak test of `cadre serve`: minutes of mixed traffic, the server's memory over time, and whether it levels off.

One run, on loopback, everything started here and stopped again:

1. A throwaway project with two specialists: `qa` (free-form answers, no retrieval) and `coder` (ICD-10
   codes, retrieving from a small real LanceDB index built by the re-index engine), its own MLflow server
   (`cadre up --only mlflow`), two registered `program` versions of `qa` and, when llama.cpp's LoRA
   converter is installed, two random LoRA `adapter` versions of `coder` (GGUF).
2. `cadre serve` as a subprocess (routing on), polling the registry every few seconds.
3. `--clients` threads send mixed traffic for `--minutes`: plain chat to each specialist and to `auto`,
   streams read to the end, streams dropped after the first chunk (a client that goes away), feedback
   on earlier answers, and hostile requests that must get a 4xx. Meanwhile the champions are moved back
   and forth every `--swap-every` seconds (program of `qa`, adapter of `coder`), so the server keeps
   swapping snapshots in and freeing the old ones.
4. The server's RSS (and its anonymous part: the heap, not the memory-mapped model file) is sampled every
   few seconds; the report gives it at the start and after 1, 5 and 10 minutes, requests served,
   errors, p50/p95 latency, the ERROR lines of the server log, and whether memory is flat within 5 %
   after the warm-up.

What it found (issue 19: RSS had grown ~0.45 MB per request, 1,348 → 1,543 MB over 140 requests): most of
the first 100-odd requests' growth is warm-up (the router's and index's models, compute buffers, adapters
touched for the first time). What kept growing after it was glibc, not a leak of live objects: llama.cpp
allocates and frees blocks of tens of MB while generating and loading adapters, and glibc's dynamic mmap
threshold kept them in the heap once freed (in one process, 150 generations: +91 MB, all given back by
`malloc_trim`; 40 adapter swaps +30 MB; Python objects +0.15 MB over 300 requests by tracemalloc; index
search, the router's embedding and the feedback store under 0.1 MB of anonymous memory per 100 calls).
`cadre serve` now fixes the threshold (`cadre.serving.app.return_freed_memory_to_the_os`); over 10 minutes
the slope after warm-up fell from 12.9 to 5.9 MB per 100 requests and the peak RSS from +5.4 % to +2.0 %.
What is left (~5 MB per 100 requests; 20 minutes: +5.9 %) shows in none of those parts measured alone, and
capping glibc's arenas (MALLOC_ARENA_MAX=2) did not change it: it is not yet traced.

Run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py [--minutes 10] [--clients 2] [--swap-every 60] [--json out.json]
    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --minutes 2 --mix chat_qa=1   # one kind of traffic only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadre.config import load_config
from cadre.platform.env import OFFLINE_ENV


def _load_serve_bench():
    """`bench/serve.py`'s helpers (free port, start and stop `cadre serve`), loaded by path: bench/ is not a package."""
    spec = importlib.util.spec_from_file_location("cadre_bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_bench = _load_serve_bench()
console = Console(width=120)

PROJECT = "soak"
SUITE = ROOT / "evals" / "suites" / "icd10-coder"
QUESTIONS = serve_bench.QUESTIONS
PHRASES = [
    "Reticular erythematous mucinosis",
    "Ethmoidal polyp of sinus",
    "Viral oral mucositis (ulcerative)",
    "typhoid endocarditis",
    "acute appendicitis with generalized peritonitis",
    "chronic lactic acidosis",
]
MIX = {
    "chat_qa": 30,
    "chat_coder": 20,
    "chat_auto": 10,
    "stream": 10,
    "stream_dropped": 10,
    "feedback": 15,
    "hostile": 5,
}
HOSTILE = [
    # (body, what it is): each must be answered with a 4xx and nothing stored
    (b'{"model": "qa", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    (b'{"model": "qa", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "deeply nested JSON"),
    (b'{"model": "qa", "messages": [{"role": "user", "content": "x\\u0000y"}]}', "NUL in content"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}', "unknown specialist"),
]
WARM_UP_FRACTION = 0.2
PLATEAU_TOLERANCE = 0.05


def write_project(folder: Path, max_tokens: int) -> Path:
    """The soak project: `qa` without retrieval, `coder` retrieving from a small ICD-10 index."""
    suite = folder / "suite"
    suite.mkdir(parents=True, exist_ok=True)
    lines = (SUITE / "test.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    for split in ("train", "dev", "test"):
        (suite / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    codes = sorted({json.loads(line)["code"] for line in lines})
    free = serve_bench._free_port
    (folder / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: state
          mlflow: {{port: {free()}}}
          prefect: {{port: {free()}}}
          lm: {{port: {free()}, n_threads: 1}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: qa
            description: General knowledge questions about geography, science and everyday facts.
            examples: ["What is the capital of France?", "Why is the sky blue?"]
            program:
              instruction: Answer the question in one short sentence.
              inputs: [{{name: question}}]
              outputs: [{{name: answer}}]
              retrieve_k: 0
              max_tokens: {max_tokens}
            evaluation: {{suite: suite}}
          - name: coder
            description: >-
              Medical coding: maps a clinical phrase (a diagnosis as a clinician writes it) to the
              billable ICD-10-CM code that classifies it.
            examples: ["Which ICD-10 code is typhoid endocarditis?", "code for acute appendicitis"]
            sources:
              - kind: python
                name: icd10cm
                entrypoint: cadre.demo.icd10:load_documents
                options: {{billable_only: true, priority_ids: {json.dumps(codes)}}}
            program:
              instruction: Given a clinical phrase and candidate ICD-10-CM codes, answer with the single billable code.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 3
              max_tokens: 8
            evaluation: {{suite: suite, answer_metrics: [exact_match], retrieval_metrics: ["recall@3"]}}
            smoke: {{max_documents: 60}}
        """)
    )
    os.environ.setdefault("CADRE_MODELS_DIR", str(ROOT / ".cadre" / "models"))
    return folder / "pipelines.yaml"


# --------------------------------------------------------------------------------- champions


def _log_and_register(config, kind: str, specialist: str, folder: Path) -> str:
    from mlflow import MlflowClient

    from cadre.registry.versions import register_candidate

    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(PROJECT) or client.get_experiment(client.create_experiment(PROJECT))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), kind)
    client.set_terminated(run.info.run_id)
    version = register_candidate(
        client,
        project=PROJECT,
        specialist=specialist,
        kind=kind,
        run_id=run.info.run_id,
        artifact_path=kind,
        lineage={"base_model": "gemma3-270m"},
        actor="soak",
    )
    return str(version.version)


def register_programs(config) -> list[str]:
    """Two `qa` programs (no demo, and one demo): their prompts differ, so a swap changes what serves."""
    import dspy

    from cadre.prompts.program import SpecialistProgram, save_program

    settings = config.specialist("qa").program
    versions = []
    for index, demos in enumerate(([], [dspy.Example(question="What do cows drink?", answer="Water.")])):
        program = SpecialistProgram(settings)
        program.answer.demos = demos
        folder = config.state_dir / "work" / f"program-{index}"
        save_program(program, folder / "program.json")
        versions.append(_log_and_register(config, "program", "qa", folder))
    return versions


def register_adapters(config) -> list[str]:
    """Two random LoRA adapters of `coder`, exported to GGUF; none when llama.cpp's converter is not installed."""
    from cadre.runtime.base_model import ensure_hf_model
    from cadre.tuning.adapter_export import ConverterMissingError, find_converter, random_adapter

    try:
        find_converter(config.state_dir)
    except ConverterMissingError as error:
        console.print(f"[yellow]no adapter swaps: {str(error).splitlines()[0]}[/yellow]")
        return []
    import torch

    torch.set_num_threads(1)
    hf = ensure_hf_model(config)
    versions = []
    for seed in (1, 2):
        exported = random_adapter(hf, config.state_dir / "work" / f"adapter-{seed}", config.state_dir, seed)
        versions.append(_log_and_register(config, "adapter", "coder", exported.folder))
    return versions


def promote(config, specialist: str, kind: str, version: str) -> None:
    from mlflow import MlflowClient

    from cadre.registry.versions import promote as promote_version

    promote_version(
        MlflowClient(config.project.mlflow.uri),
        project=PROJECT,
        specialist=specialist,
        kind=kind,
        version=version,
        actor="soak",
        force=True,
        reason="soak test moves the champion back and forth",
    )


# ----------------------------------------------------------------------------------- traffic


@dataclass
class Tally:
    """What the clients saw (shared by the client threads under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies_ms: list[float] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    response_ids: list[str] = field(default_factory=list)

    def count(self, kind: str, problem: str | None = None, latency_ms: float | None = None) -> None:
        with self.lock:
            self.sent[kind] += 1
            if latency_ms is not None:
                self.latencies_ms.append(latency_ms)
            if problem is not None:
                self.errors[kind] += 1
                if len(self.error_examples) < 10:
                    self.error_examples.append(f"{kind}: {problem}")

    @property
    def requests(self) -> int:
        with self.lock:
            return sum(self.sent.values())


def _chat_body(model: str, content: str, stream: bool = False) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}


def one_request(client: httpx.Client, url: str, kind: str, rng: random.Random, tally: Tally) -> None:
    """Send one request of `kind` and record what came back (anything but the expected status is an error)."""
    started = time.perf_counter()
    try:
        if kind.startswith("chat_"):
            model = kind.removeprefix("chat_")
            text = rng.choice(PHRASES if model == "coder" else QUESTIONS if model == "qa" else QUESTIONS + PHRASES)
            response = client.post(f"{url}/v1/chat/completions", json=_chat_body(model, text))
            latency = 1000 * (time.perf_counter() - started)
            if model == "auto" and response.status_code == 422:
                tally.count(kind, latency_ms=latency)  # nothing close enough: a correct answer for `auto`
                return
            if response.status_code != 200:
                tally.count(kind, f"{response.status_code} {response.text[:200]}")
                return
            with tally.lock:
                tally.response_ids.append(response.json()["id"])
                del tally.response_ids[:-200]
            tally.count(kind, latency_ms=latency)
        elif kind in ("stream", "stream_dropped"):
            body = _chat_body("qa", rng.choice(QUESTIONS), stream=True)
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    tally.count(kind, f"{response.status_code}")
                    return
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: ") and kind == "stream_dropped":
                        break  # the client goes away after the first chunk; closing the response drops the socket
                    if line == "data: [DONE]":
                        break
                else:
                    if kind == "stream":
                        tally.count(kind, "the stream ended without [DONE]")
                        return
            tally.count(kind)
        elif kind == "feedback":
            with tally.lock:
                known = rng.choice(tally.response_ids) if tally.response_ids else None
            if known is None:
                tally.count(kind)
                return
            body = {"response_id": known, "rating": rng.choice((-1, 0, 1)), "comment": "soak"}
            if rng.random() < 0.5:
                body["correction"] = rng.choice(("Paris.", "A01.02", "Water."))
            response = client.post(f"{url}/v1/feedback", json=body)
            # A correction of `coder`'s field name on a `qa` answer is named, never guessed: a string fits either.
            tally.count(kind, None if response.status_code == 201 else f"{response.status_code} {response.text[:200]}")
        elif kind == "hostile":
            raw, what = rng.choice(HOSTILE)
            response = client.post(
                f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            ok = 400 <= response.status_code < 500
            tally.count(kind, None if ok else f"{what}: {response.status_code} {response.text[:200]}")
        else:
            raise ValueError(f"unknown traffic kind {kind!r}")
    except httpx.HTTPError as error:
        tally.count(kind, f"{type(error).__name__}: {error}")


def client_loop(url: str, seed: int, weights: dict[str, int], deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, shares = list(weights), list(weights.values())
    with httpx.Client(timeout=300) as client:
        while time.monotonic() < deadline:
            one_request(client, url, rng.choices(kinds, shares)[0], rng, tally)


def swap_loop(config, plan: list[tuple[str, str, list[str]]], every_s: float, deadline: float, swaps: list) -> None:
    """Move each champion to its other version every `every_s` seconds (the server's watcher swaps it in)."""
    turn = 0
    while time.monotonic() + every_s < deadline:
        time.sleep(every_s)
        for specialist, kind, versions in plan:
            version = versions[(turn + 1) % len(versions)]
            try:
                promote(config, specialist, kind, version)
                swaps.append((time.monotonic(), f"{specialist} {kind} v{version}"))
            except Exception as error:  # noqa: BLE001 - a failed move is reported, the soak goes on
                swaps.append((time.monotonic(), f"FAILED {specialist} {kind} v{version}: {error}"))
        turn += 1


def memory_of(pid: int) -> tuple[float, float]:
    """(RSS, anonymous RSS) of a process in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["RssAnon"]


def sample_loop(pid: int, tally: Tally, every_s: float, stop: threading.Event, samples: list) -> None:
    started = time.monotonic()
    while True:
        try:
            rss, anon = memory_of(pid)
        except (FileNotFoundError, KeyError, ProcessLookupError):
            return
        samples.append((time.monotonic() - started, tally.requests, rss, anon))
        if stop.wait(every_s):
            return


# ------------------------------------------------------------------------------------ report


def at(samples: list, seconds: float) -> tuple[float, int, float, float] | None:
    """The sample nearest to `seconds` after the start, if the run got that far."""
    if not samples or samples[-1][0] + 5 < seconds:
        return None
    return min(samples, key=lambda sample: abs(sample[0] - seconds))


def plateau(samples: list, warm_up_s: float) -> dict:
    """Growth after the warm-up: the peak RSS of the last tenth of the run vs. the first tenth after warm-up.

    Peaks, not single samples: RSS swings by one generation's buffers (tens of MB) depending on whether a request
    is generating when it is sampled. Also a least-squares slope of RSS per 100 requests over everything after the
    warm-up.
    """
    after = [s for s in samples if s[0] >= warm_up_s]
    if len(after) < 6:
        return {"judged": False}
    span = max(3, len(after) // 10)
    first, last = after[:span], after[-span:]
    requests = [s[1] for s in after]
    slope = {}
    for name, column in (("rss", 2), ("anon", 3)):
        values = [s[column] for s in after]
        mean_r, mean_v = statistics.fmean(requests), statistics.fmean(values)
        spread = sum((r - mean_r) ** 2 for r in requests)
        slope[name] = 100 * sum((r - mean_r) * (v - mean_v) for r, v in zip(requests, values)) / spread if spread else 0
    peak_first, peak_last = max(s[2] for s in first), max(s[2] for s in last)
    anon_first, anon_last = max(s[3] for s in first), max(s[3] for s in last)
    growth = (peak_last - peak_first) / peak_first
    return {
        "judged": True,
        "warm_up_s": warm_up_s,
        "rss_after_warm_up_mb": peak_first,
        "rss_end_mb": peak_last,
        "growth": growth,
        "anon_growth": (anon_last - anon_first) / anon_first,
        "mb_per_100_requests": slope["rss"],
        "anon_mb_per_100_requests": slope["anon"],
        "flat": abs(growth) <= PLATEAU_TOLERANCE,
    }


def log_errors(log_path: Path) -> list[str]:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.exists() else []
    return [line for line in lines if " ERROR " in line or "Traceback" in line or "never retrieved" in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to send traffic (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (default: %(default)s)")
    parser.add_argument(
        "--swap-every", type=float, default=60.0, help="seconds between champion moves; 0: none (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per `qa` answer (default: %(default)s)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in MIX.items()),
        help="traffic kinds and weights, e.g. chat_qa=1,stream_dropped=1 (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures and every sample to this file")
    parser.add_argument("--keep", type=Path, help="copy the server log here")
    args = parser.parse_args()
    weights = {name: int(weight) for name, _, weight in (part.partition("=") for part in args.mix.split(","))}
    unknown = set(weights) - set(MIX)
    if unknown:
        parser.error(f"unknown traffic kind(s) {', '.join(sorted(unknown))}; known: {', '.join(MIX)}")
    os.environ.update(OFFLINE_ENV)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # one line per champion move otherwise

    from cadre.knowledge.reindex import promote_version, reindex_specialist
    from cadre.platform.stack import Stack

    with tempfile.TemporaryDirectory(prefix="cadre-soak-") as folder:
        config_path = write_project(Path(folder), args.max_tokens)
        config = load_config(config_path)
        stack = Stack(config)
        quiet = Console(stderr=True, quiet=True)
        prepared = time.perf_counter()
        stack.up(services=["mlflow"], console=quiet)
        server = None
        try:
            built = reindex_specialist(config, "coder", budget="smoke", show_progress=False)
            promote_version(config.state_dir, "coder", built.version)
            plan = []
            programs = register_programs(config)
            promote(config, "qa", "program", programs[0])
            plan.append(("qa", "program", programs))
            adapters = register_adapters(config)
            if adapters:
                promote(config, "coder", "adapter", adapters[0])
                plan.append(("coder", "adapter", adapters))
            port = serve_bench._free_port()
            url = f"http://127.0.0.1:{port}"
            swap_every = min(args.swap_every, 60 * args.minutes / 3)  # a short run still swaps a few times
            server = start_server(config_path, port, poll_interval=min(5.0, max(1.0, swap_every / 4)))
            console.print(
                f"stack, index, {len(programs)} programs, {len(adapters)} adapters and cadre serve ready in "
                f"{time.perf_counter() - prepared:.0f} s; soaking for {args.minutes:g} min with {args.clients} "
                f"client(s), mix {weights}"
            )
            tally, samples, swaps = Tally(), [], []
            stop = threading.Event()
            deadline = time.monotonic() + 60 * args.minutes
            sampler = threading.Thread(target=sample_loop, args=(server.pid, tally, args.sample_every, stop, samples))
            sampler.start()
            threads = [
                threading.Thread(target=client_loop, args=(url, args.seed + i, weights, deadline, tally))
                for i in range(args.clients)
            ]
            if swap_every > 0 and plan:
                threads.append(threading.Thread(target=swap_loop, args=(config, plan, swap_every, deadline, swaps)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stop.set()
            sampler.join()
            health = httpx.get(f"{url}/health", timeout=30).json()
            alive = server.poll() is None
        finally:
            if server is not None:
                serve_bench.stop_server(server)
            stack.down(console=quiet)
        log_path = config_path.parent / "serve.log"
        problems = log_errors(log_path)
        if args.keep:
            args.keep.write_bytes(log_path.read_bytes())

    return report(args, weights, tally, samples, swaps, health, alive, problems)


def start_server(config_path: Path, port: int, poll_interval: float):
    """`cadre serve` with routing on (bench/serve.py's starter turns it off) and a short registry poll."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))} | OFFLINE_ENV
    log = (config_path.parent / "serve.log").open("wb")
    command = [sys.executable, "-m", "cadre.cli", "serve", "-c", str(config_path), "--port", str(port)]
    command += ["--threads", "1", "--max-in-flight", "8", "--poll-interval", str(poll_interval)]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=config_path.parent, start_new_session=True
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


def report(args, weights, tally: Tally, samples, swaps, health, alive: bool, problems: list[str]) -> int:
    duration_s = samples[-1][0] if samples else 0.0
    warm_up_s = WARM_UP_FRACTION * 60 * args.minutes
    verdict = plateau(samples, warm_up_s)
    ordered = sorted(tally.latencies_ms)
    p50 = statistics.median(ordered) if ordered else float("nan")
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")

    table = Table(title=f"cadre serve memory over {duration_s / 60:.1f} min of mixed traffic")
    for column in ("at", "requests so far", "RSS MB", "anonymous MB"):
        table.add_column(column, justify="right")
    checkpoints = [("start", 0.0), ("1 min", 60.0), ("5 min", 300.0), ("10 min", 600.0), ("end", duration_s)]
    for name, seconds in checkpoints:
        sample = at(samples, seconds)
        if sample is not None:
            table.add_row(name, str(sample[1]), f"{sample[2]:.0f}", f"{sample[3]:.0f}")
    console.print(table)

    table = Table(title="Traffic")
    for column in ("kind", "sent", "errors"):
        table.add_column(column, justify="right")
    for kind in weights:
        colour = "red" if tally.errors[kind] else "green"
        table.add_row(kind, str(tally.sent[kind]), f"[{colour}]{tally.errors[kind]}[/{colour}]")
    console.print(table)
    errors = sum(tally.errors.values())
    console.print(
        f"requests {tally.requests}, errors {errors}, chat latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; "
        f"champion moves {len(swaps)}, swaps done by the server {health['watcher']['swaps'] if health.get('watcher') else 0}; "
        f"served (server count) {health.get('served')}; server alive {alive}; ERROR lines in its log {len(problems)}"
    )
    for example in tally.error_examples:
        console.print(f"  [red]{example}[/red]")
    for line in problems[:10]:
        console.print(f"  [red]log: {line[:200]}[/red]")
    if verdict["judged"]:
        colour = "green" if verdict["flat"] else "red"
        console.print(
            f"[{colour}]memory {'flat' if verdict['flat'] else 'NOT flat'}[/{colour}] after {warm_up_s:.0f} s of "
            f"warm-up: peak RSS {verdict['rss_after_warm_up_mb']:.0f} → {verdict['rss_end_mb']:.0f} MB "
            f"({100 * verdict['growth']:+.1f} %, anonymous {100 * verdict['anon_growth']:+.1f} %); slope "
            f"{verdict['mb_per_100_requests']:+.2f} MB per 100 requests (anonymous {verdict['anon_mb_per_100_requests']:+.2f})"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "minutes": args.minutes,
                    "clients": args.clients,
                    "mix": weights,
                    "requests": tally.requests,
                    "sent": dict(tally.sent),
                    "errors": dict(tally.errors),
                    "error_examples": tally.error_examples,
                    "p50_ms": p50,
                    "p95_ms": p95,
                    "swaps": swaps,
                    "log_errors": problems,
                    "plateau": verdict,
                    "samples": samples,
                },
                indent=1,
            )
        )
    flat = verdict.get("flat", True)
    return 0 if alive and not errors and not problems and flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
