"""Read `pipelines.yaml` and report every problem at once, as `FILE:LINE:COL: field.path: message`.

The YAML is parsed with ruamel so every key keeps its line; pydantic validates the merged data;
each pydantic error is mapped back to the line it came from (a specialist's own line, or the
`defaults:` line it inherited) and rewritten as a sentence with a "did you mean" for typos.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from cadre.config.base import FieldError
from cadre.config.pipelines import CadreConfig, PipelinesFile, merge_defaults

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in the file."""

    line: int
    column: int
    field: str
    message: str

    def render(self, file: str) -> str:
        """`FILE:LINE:COL: field: message` on one line (line breaks and control characters in values are escaped)."""
        where = f"{self.field}: " if self.field else ""
        return _LINE_BREAKING.sub(_escaped, f"{file}:{self.line}:{self.column}: {where}{self.message}")


# Characters that end a line for str.splitlines() (and terminals), and other control characters.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(found: re.Match[str]) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(found.group(), f"\\u{ord(found.group()):04x}")


class ConfigError(Exception):
    """`pipelines.yaml` is not valid; `issues` lists every problem, in file order."""

    def __init__(self, file: Path, issues: list[ConfigIssue]):
        self.file = file
        self.issues = issues
        super().__init__("\n".join(issue.render(str(file)) for issue in issues))


def load_config(file: str | Path = "pipelines.yaml") -> CadreConfig:
    """Parse and validate a pipelines file.

    Args:
        file: path of the YAML file; relative paths inside it are read from its folder.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: with every problem found, each naming its line and field.
    """
    path = Path(file)
    display = path
    if not path.is_file():
        raise ConfigError(display, [ConfigIssue(1, 1, "", f"file not found: {path.resolve()}")])
    raw_bytes = path.read_bytes()
    try:
        document = _parse_yaml(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(display, [ConfigIssue(1, 1, "", f"not UTF-8 text: {error}")]) from None
    except DuplicateKeyError as error:
        mark = error.problem_mark
        raise ConfigError(
            display, [ConfigIssue(mark.line + 1, mark.column + 1, "", f"duplicate key: {error.problem}")]
        ) from None
    except MarkedYAMLError as error:
        raise ConfigError(display, [_syntax_issue(error)]) from None
    except ReaderError as error:  # a character YAML does not allow (NUL, other controls)
        text = raw_bytes.decode("utf-8")
        line = text.count("\n", 0, error.position) + 1
        column = error.position - text.rfind("\n", 0, error.position)
        raise ConfigError(
            display,
            [ConfigIssue(line, column, "", f"YAML does not allow the character U+{error.character:04X} here")],
        ) from None
    except YAMLError as error:
        raise ConfigError(display, [ConfigIssue(1, 1, "", f"not valid YAML: {error}")]) from None
    except _UnreadableYAML as error:
        raise ConfigError(display, [ConfigIssue(1, 1, "", str(error))]) from None
    except RecursionError:
        raise ConfigError(display, [ConfigIssue(1, 1, "", "YAML nested too deeply to read")]) from None

    if not isinstance(document, dict):
        raise ConfigError(
            display, [ConfigIssue(1, 1, "", "the file must be a mapping with `project` and `specialists` keys")]
        )
    locations: dict[Path_, tuple[int, int]] = {}
    data = _plain(document, (), locations)
    merged = _with_project_settings_from_env(_with_defaults(data))
    issues: list[ConfigIssue] = []
    if isinstance(data.get("defaults"), dict) and "name" in data["defaults"]:
        line, column = locations.get(("defaults", "name"), (1, 1))
        issues.append(
            ConfigIssue(line, column, "defaults.name", "defaults cannot set `name`; each specialist names itself")
        )

    root = path.resolve().parent
    pipelines = None
    try:
        pipelines = PipelinesFile.model_validate(merged, context={"root": root})
    except ValidationError as error:
        issues.extend(_issues_from(error, merged, locations))
    if issues:
        unique = {(i.line, i.column, i.message): i for i in reversed(issues)}
        raise ConfigError(display, sorted(unique.values(), key=lambda i: (i.line, i.column)))
    return CadreConfig(file=path.resolve(), pipelines=pipelines, sha256=hashlib.sha256(raw_bytes).hexdigest())


class _UnreadableYAML(Exception):
    """ruamel failed on the text with an error of its own (not a YAMLError)."""


def _parse_yaml(text: str) -> Any:
    try:
        return YAML(typ="rt").load(text)
    except (YAMLError, RecursionError):
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a merge key (<<) that refers to its own mapping
        raise _UnreadableYAML(
            f"YAML that cannot be read ({type(error).__name__}: {error}); check anchors (&), aliases (*) and merge keys (<<)"
        ) from error


_OPENED = ("while parsing a flow", "while scanning a quoted scalar", "while scanning a flow")
"""ruamel's contexts for a bracket, brace or quote opened and never closed: the error points at its opening."""


def _syntax_issue(error: MarkedYAMLError) -> ConfigIssue:
    """A YAML syntax error at its line; one about an unclosed `[`, `{` or quote at the line that opened it, naming it."""
    problem = error.problem or error.context or "not valid YAML"
    opened, found = error.context_mark, error.problem_mark
    if opened is not None and str(error.context or "").startswith(_OPENED):
        buffer, pointer = getattr(opened, "buffer", None), getattr(opened, "pointer", -1)
        opener = buffer[pointer] if isinstance(buffer, str) and 0 <= pointer < len(buffer) else ""
        if opener in ("[", "{", "'", '"'):
            closer = {"[": "]", "{": "}"}.get(opener, opener)
            where = f" at line {found.line + 1}, column {found.column + 1}" if found is not None else ""
            return ConfigIssue(
                opened.line + 1,
                opened.column + 1,
                "",
                f"YAML syntax error: the {opener!r} opened here is never closed with {closer!r} ({problem}{where})",
            )
    mark = found or opened
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    return ConfigIssue(line, column, "", f"YAML syntax error: {problem}")


def _plain(node: Any, here: Path_, locations: dict[Path_, tuple[int, int]]) -> Any:
    """Turn ruamel's nodes into plain Python, recording the (1-based) line and column of every key and item."""
    if isinstance(node, CommentedMap):
        out = {}
        for key in node:
            # A key merged in with `<<` has no position of its own: it counts as the mapping's own line.
            position = _position(node.lc.key, key)
            line, column = (position[0] + 1, position[1] + 1) if position else locations.get(here, (1, 1))
            locations[(*here, str(key))] = (line, column)
            out[str(key)] = _plain(node[key], (*here, str(key)), locations)
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for index, item in enumerate(node):
            position = _position(node.lc.item, index)
            line, column = (position[0] + 1, position[1] + 1) if position else locations.get(here, (1, 1))
            locations[(*here, index)] = (line, column)
            out_list.append(_plain(item, (*here, index), locations))
        return out_list
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def _position(lookup: Any, key: Any) -> tuple[int, int] | None:
    try:
        return lookup(key)
    except (KeyError, IndexError):
        return None


PROJECT_VARIABLES = {
    "CADRE_MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"),
    "CADRE_PREFECT_API_URL": ("prefect", "api_url"),
    "CADRE_LM_API_BASE": ("lm", "api_base"),
    "CADRE_WEAVIATE_URL": ("index", "weaviate_url"),
    "CADRE_TORCH_THREADS": ("threads", "torch"),
    "CADRE_EMBEDDING_THREADS": ("threads", "embedding"),
}
"""Environment variables that override a setting of `project`: a service's URL (e.g. a worker container, whose
services have other host names than the laptop that shares its `pipelines.yaml`), or the CPU threads of one process
(`cadre demo` gives each flow run its share of the cores when it runs the specialists' cycles side by side)."""


def _with_project_settings_from_env(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with `project.<section>.<field>` set from each `PROJECT_VARIABLES` variable that is set."""
    found = {name: os.environ[name] for name in PROJECT_VARIABLES if os.environ.get(name)}
    project = data.get("project")
    if not found or not isinstance(project, dict):
        return data
    project = dict(project)
    for name, value in found.items():
        section, field = PROJECT_VARIABLES[name]
        settings = project.get(section)
        if settings is not None and not isinstance(settings, dict):
            continue  # not a mapping: validation reports the file's mistake as it is
        project[section] = {**(settings or {}), field: value}
    return {**data, "project": project}


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    defaults = data.get("defaults")
    specialists = data.get("specialists")
    if not isinstance(defaults, dict) or not isinstance(specialists, list):
        return data
    inherited = {k: v for k, v in defaults.items() if k != "name"}
    merged = [merge_defaults(inherited, s) if isinstance(s, dict) else s for s in specialists]
    return {**data, "specialists": merged}


def _issues_from(error: ValidationError, data: Any, locations: dict[Path_, tuple[int, int]]) -> list[ConfigIssue]:
    grouped: dict[Path_, list[dict[str, Any]]] = {}
    for item in error.errors():
        loc = tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = (*loc, *cause.loc)
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "kind")
        grouped.setdefault(_data_path(loc, data), []).append(item)
    issues = []
    for data_path, items in grouped.items():
        line, column = _locate(data_path, locations)
        message = " or ".join(dict.fromkeys(_sentence(item, data_path, data) for item in items))
        issues.append(ConfigIssue(line, column, _render_path(data_path, data), message))
    return issues


def _data_path(loc: Path_, data: Any) -> Path_:
    """Drop the parts of a pydantic `loc` that are union tags or member names rather than keys of the data."""
    path: list[str | int] = []
    node = data
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and 0 <= part < len(node)
        ):
            node = node[part]
        elif not last:
            if isinstance(node, dict) and isinstance(part, str) and part.isidentifier() and part not in _UNION_LABELS:
                path.append(part)
                node = None
            continue
        path.append(part)
    return tuple(path)


_UNION_LABELS = {"files", "dataset", "sql", "python"}


def _locate(path: Path_, locations: dict[Path_, tuple[int, int]]) -> tuple[int, int]:
    """The line of a merged path: the specialist's own key, else the `defaults:` key it inherited, else its parent."""
    for length in range(len(path), 0, -1):
        candidate = path[:length]
        if candidate in locations:
            return locations[candidate]
        if candidate[0] == "specialists" and len(candidate) > 2:
            inherited = ("defaults", *candidate[2:])
            if inherited in locations:
                return locations[inherited]
    return (1, 1)


def _render_path(path: Path_, data: Any) -> str:
    text = ""
    node = data
    for part in path:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and isinstance(node[part], dict) else None
            text += f"[{name}]" if isinstance(name, str) and name else f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    return text


def _has(node: dict | list, part: str | int) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def _sentence(item: dict[str, Any], path: Path_, data: Any) -> str:
    kind = item["type"]
    ctx = item.get("ctx") or {}
    got = _show(item.get("input"))
    field_info = _field_at(path, data)
    if kind == "extra_forbidden":
        allowed = _fields_at(path[:-1], data)
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6)
        suggestion = (
            f"; did you mean {hint[0]!r}?" if hint else (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        )
        return f"unknown key {path[-1]!r}{suggestion}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected {_integer_kind(field_info)}, got {got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got}"
    if kind in ("string_type",):
        return f"expected text, got {got}"
    if kind in ("list_type",):
        return f"expected a list, got {got}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {got}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        options = [o.strip().strip("'") for o in str(expected).replace(" or ", ",").split(",") if o.strip()]
        hint = difflib.get_close_matches(str(item.get("input")), options, n=1, cutoff=0.5)
        return f"expected one of {expected}, got {got}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        options = [o.strip(" '") for o in str(ctx.get("expected_tags", "")).split(",")]
        hint = difflib.get_close_matches(tag, options, n=1, cutoff=0.5)
        return f"unknown kind {_show(tag)}; expected one of {ctx.get('expected_tags')}" + (
            f"; did you mean {hint[0]!r}?" if hint else ""
        )
    if kind == "union_tag_not_found":
        return (
            f"missing `{ctx.get('discriminator', 'kind').strip(chr(39))}`; expected one of files, dataset, sql, python"
        )
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = {
            "greater_than": "> {gt}",
            "greater_than_equal": "≥ {ge}",
            "less_than": "< {lt}",
            "less_than_equal": "≤ {le}",
        }[kind].format(**ctx)
        noun = (
            _integer_kind(field_info)
            if _is_int(field_info) and kind.startswith("greater") and str(ctx.get("gt", ctx.get("ge"))) in ("0", "1")
            else "a number"
        )
        return f"expected {noun} {bound}, got {got}" if noun == "a number" else f"expected {noun}, got {got}"
    if kind in ("too_short", "too_long"):
        return f"{item['msg'].lower()}, got {got}"
    if kind == "string_pattern_mismatch":
        return f"{got} is not allowed here: use lowercase letters, digits and dashes/underscores as the pattern {ctx.get('pattern')} says"
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        return str(cause.message if isinstance(cause, FieldError) else cause)
    return f"{item['msg']}, got {got}"


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_int(field_info: FieldInfo | None) -> bool:
    return field_info is not None and int in _members(field_info.annotation)


def _integer_kind(field_info: FieldInfo | None) -> str:
    if field_info is not None:
        for meta in field_info.metadata:
            if getattr(meta, "gt", None) == 0 or getattr(meta, "ge", None) == 1:
                return "a positive integer"
            if getattr(meta, "ge", None) == 0:
                return "a non-negative integer"
    return "an integer"


def _members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    return (annotation,)


def _model_of(annotation: Any, node: Any) -> Any:
    """The schema type a data node is validated against (unwrapping Optional, lists, and tagged unions)."""
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):
        for model in models:
            tag = model.model_fields.get("kind")
            if tag is not None and node.get("kind") in typing.get_args(tag.annotation):
                return model
    return models[0] if models else annotation


class _ListOf:
    """Marker for a list field while walking the schema: the next (integer) step picks the item type."""

    def __init__(self, item: Any):
        self.item = item


def _field_at(path: Path_, data: Any) -> FieldInfo | None:
    return _walk_fields(path, data)[1]


def _fields_at(path: Path_, data: Any) -> list[str]:
    model = _walk_fields(path, data)[0]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _walk_fields(path: Path_, data: Any) -> tuple[Any, FieldInfo | None]:
    """Follow a data path through the schema; returns (model or type at the path, FieldInfo of its last field)."""
    current: Any = PipelinesFile
    field_info: FieldInfo | None = None
    node = data
    for part in path:
        if isinstance(current, _ListOf):
            node = node[part] if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node) else None
            current = _model_of(current.item, node)
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None, None
        field_info = current.model_fields[part]
        node = node.get(part) if isinstance(node, dict) else None
        annotation = field_info.annotation
        list_types = [m for m in _members(annotation) if typing.get_origin(m) is list]
        if list_types and isinstance(node, list):
            current = _ListOf(typing.get_args(list_types[0])[0])
        else:
            current = _model_of(annotation, node)
    return current, field_info
