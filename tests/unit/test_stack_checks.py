"""`cadre up` checks that a started service does its work, not only that it answers its health check.

The LM here is a real process: a small HTTP server answering `/models` like llama.cpp's and, like a llama.cpp
build whose AMX kernels crash on the machine's CPU, killed by SIGSEGV on its first completion.
"""

from __future__ import annotations

import io
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from cadre.config import load_config
from cadre.platform.stack import Service, Stack, StackError, _generates

SERVER = textwrap.dedent(
    """\
    import json, os, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    CRASH = sys.argv[2] == "crash"

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "m"}]})

        def do_POST(self):
            if CRASH:
                os.kill(os.getpid(), signal.SIGSEGV)
            self._send({"choices": [{"text": " hi"}]})

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


class OneService(Stack):
    def __init__(self, config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def services(self) -> list[Service]:
        return [self.service]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stack(tmp_path: Path, behaviour: str) -> OneService:
    (tmp_path / "evals" / "suite").mkdir(parents=True)
    (tmp_path / "pipelines.yaml").write_text(
        "version: 1\nproject: {name: t}\nspecialists:\n  - name: coder\n    description: d\n"
        "    program: {instruction: i, inputs: [{name: q}], outputs: [{name: a}], retrieve_k: 0}\n"
        "    evaluation: {suite: evals/suite}\n"
        "    gates: {program: [{metric: exact_match, at_least: 0.1}]}\n"
    )
    (tmp_path / "server.py").write_text(SERVER)
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    service = Service(
        name="lm",
        command=[sys.executable, str(tmp_path / "server.py"), str(port), behaviour],
        health_url=f"{base}/models",
        ui_url=base,
        port=port,
        host="127.0.0.1",
        timeout_s=30,
        works=lambda: _generates(base, "m"),
    )
    return OneService(load_config(tmp_path / "pipelines.yaml"), service)


def test_an_lm_that_dies_on_its_first_generation_fails_cadre_up_saying_so(tmp_path: Path) -> None:
    stack = _stack(tmp_path, "crash")
    try:
        with pytest.raises(StackError) as raised:
            stack.up(console=Console(file=io.StringIO()))
    finally:
        stack.down(console=Console(file=io.StringIO()))
    message = str(raised.value)
    assert "lm answers its health check but failed its first piece of work" in message
    assert "one-token completion" in message and "and exited" in message
    assert "rebuilds llama-cpp-python without them" in message


def test_an_lm_that_generates_is_up(tmp_path: Path) -> None:
    stack = _stack(tmp_path, "answer")
    try:
        stack.up(console=Console(file=io.StringIO()))
        assert stack.status()[0]["state"] == "up"
    finally:
        stack.down(console=Console(file=io.StringIO()))


def test_an_lm_gone_mid_run_points_at_the_local_server_only_when_it_is_the_local_one() -> None:
    """A flow whose LM stops answering says where to look when that LM is the server `cadre up` started."""
    from cadre.prompts.program import LMTarget
    from tasks.prompts import _local_server_hint

    local = LMTarget(kind="endpoint", model="m", base_url="http://127.0.0.1:8088/v1", identity="l", local_gguf="x.gguf")
    remote = LMTarget(kind="endpoint", model="m", base_url="https://api.example/v1", identity="r")
    assert "`cadre status`" in _local_server_hint(local) and "logs/lm.log" in _local_server_hint(local)
    assert _local_server_hint(remote) == ""
