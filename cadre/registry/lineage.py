"""A registered version's lineage as Markdown a reviewer can follow: its run, its parents, its data, its code.

The registry keeps lineage as tags (`cadre.lineage.<key>`, which flows and serving read back); this renders them
for people, in the version's description and as the artifact `gate/<kind>-v<N>/lineage.md`, with links that open
the parent versions and the run in the MLflow UI (relative `#/` links work in the UI's Markdown).
"""

from __future__ import annotations

from collections.abc import Mapping

from cadre.registry.runs import UI_VIEW

LINEAGE_PREFIX = "cadre.lineage."

_LABELS = {
    "run_id": "made by run",
    "parent_versions": "parent versions",
    "code_version": "code (git commit)",
    "config_sha256": "pipelines.yaml sha256",
    "data_fingerprint": "training / case data sha256",
    "corpus_fingerprint": "corpus sha256",
    "base_model": "base model",
    "index_version": "index version",
}


def lineage_markdown(tags: Mapping[str, str], project: str, specialist: str) -> str:
    """The `cadre.lineage.*` tags of a version as a Markdown table with links.

    Args:
        tags: the version's tags (other tags are ignored).
        project: project name (parent versions link to `{project}.{specialist}.{kind}`).
        specialist: specialist name.

    Returns:
        `### Lineage` and a two-column table, or an empty string when the version has no lineage tags.
    """
    found = {key.removeprefix(LINEAGE_PREFIX): value for key, value in tags.items() if key.startswith(LINEAGE_PREFIX)}
    if not found:
        return ""
    order = [key for key in _LABELS if key in found] + sorted(key for key in found if key not in _LABELS)
    lines = ["### Lineage", "", "| | |", "|---|---|"]
    for key in order:
        lines.append(f"| {_LABELS.get(key, key)} | {_cell(key, found[key], project, specialist)} |")
    return "\n".join(lines)


def _cell(key: str, value: str, project: str, specialist: str) -> str:
    if not value or value == "-":
        return "—"
    if key == "run_id":
        return f"[{value[:12]}](#/runs/{value}{UI_VIEW})"
    if key == "parent_versions":
        return ", ".join(_parent(part.strip(), project, specialist) for part in value.split(",") if part.strip())
    if key == "code_version" or len(value) >= 32:
        return f"`{value[:16]}…`" if len(value) > 20 else f"`{value}`"
    return value.replace("|", "\\|")


def _parent(part: str, project: str, specialist: str) -> str:
    """`program:3` → a link to that version; `adapter:-` → none; anything else (an index build name) as text."""
    kind, sep, version = part.partition(":")
    if not sep:
        return f"`{part}`"
    if not version or version == "-":
        return f"{kind}: none"
    return f"[{kind} v{version}](#/models/{project}.{specialist}.{kind}/versions/{version}{UI_VIEW})"
