"""Index manifests stored as differences: a small change writes a small manifest, reading gives the whole content,
long chains and large changes are written whole, and removing a base (pruning) keeps its dependents readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cadre.knowledge.index.manifest import (
    MAX_DELTA_CHAIN,
    IndexKey,
    IndexLayout,
    Manifest,
    ManifestError,
)

KEY = IndexKey("packaged:all-minilm-l6-v2", "abc", 384, 128, 16)


def documents(count: int, edited: range = range(0), tag: str = "") -> dict[str, tuple[str, list[str]]]:
    return {f"d{n:05d}": (f"h{n}{tag if n in edited else ''}", [f"c{n}-0", f"c{n}-1"]) for n in range(count)}


def write(layout: IndexLayout, version: str, base: str | None, docs: dict) -> Path:
    return layout.write_manifest(Manifest("coder", version, base, KEY, docs, "t0", "t1", "fp"))


def test_a_small_change_writes_a_small_manifest_and_reads_back_whole(tmp_path: Path) -> None:
    layout = IndexLayout(tmp_path, "coder")
    full = write(layout, "v1", None, documents(2000))
    changed = documents(2000, edited=range(10), tag="'")
    del changed["d01999"]
    changed["new"] = ("hn", ["cn"])
    delta = write(layout, "v2", "v1", changed)

    assert delta.stat().st_size < full.stat().st_size / 50, (delta.stat().st_size, full.stat().st_size)
    content = json.loads(delta.read_text())
    assert content["documents_delta"]["base"] == "v1" and "documents" not in content
    assert content["counts"] == {"documents": 2000, "chunks": 3999}
    assert layout.read_manifest("v2").documents == changed
    assert layout.manifest_json("v2")["documents"]["new"] == ["hn", ["cn"]]


def test_a_large_change_and_a_long_chain_are_written_whole(tmp_path: Path) -> None:
    layout = IndexLayout(tmp_path, "coder")
    write(layout, "v00", None, documents(100))
    rewritten = write(layout, "v01", "v00", documents(100, edited=range(30), tag="'"))  # 30 % changed
    assert "documents" in json.loads(rewritten.read_text())

    docs = documents(100, edited=range(30), tag="'")
    for n in range(2, 2 + MAX_DELTA_CHAIN + 1):  # each version changes one more document
        docs = {**docs, f"d{n:05d}": (f"h{n}-v{n}", [f"c{n}-0"])}
        write(layout, f"v{n:02d}", f"v{n - 1:02d}", docs)
    kinds = ["documents_delta" in json.loads(layout.manifest_path(f"v{n:02d}").read_text()) for n in range(1, 11)]
    # v01 whole; v02..v08 differences (v08 is the 7th, read through 8 files); v09 whole again; v10 a difference.
    assert kinds == [False, True, True, True, True, True, True, True, False, True]
    assert layout.read_manifest("v10").documents == docs


def test_removing_a_base_writes_its_dependents_whole(tmp_path: Path) -> None:
    layout = IndexLayout(tmp_path, "coder")
    write(layout, "v1", None, documents(200))
    write(layout, "v2", "v1", documents(200, edited=range(3), tag="'"))
    write(layout, "v3", "v2", documents(200, edited=range(5), tag="'"))

    layout.remove_manifest("v2")
    assert not layout.is_complete("v2")
    assert "documents" in json.loads(layout.manifest_path("v3").read_text())
    assert layout.read_manifest("v3").documents == documents(200, edited=range(5), tag="'")
    assert layout.read_manifest("v1").documents == documents(200)


def test_a_difference_whose_base_is_gone_says_so(tmp_path: Path) -> None:
    layout = IndexLayout(tmp_path, "coder")
    write(layout, "v1", None, documents(200))
    write(layout, "v2", "v1", documents(200, edited=range(3), tag="'"))
    layout.manifest_path("v1").unlink()  # (not through remove_manifest: a hand-deleted file)
    with pytest.raises(ManifestError, match="difference from v1, whose manifest is gone"):
        layout.read_manifest("v2")
