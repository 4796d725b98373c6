"""The JSON Schema of `pipelines.yaml`, for editors (yaml-language-server) and CI."""

from __future__ import annotations

import copy
from typing import Any

from cadre.config.pipelines import PipelinesFile


def json_schema() -> dict[str, Any]:
    """JSON Schema of the file; `defaults` is described as a specialist whose every key is optional."""
    schema = PipelinesFile.model_json_schema()
    specialist = copy.deepcopy(schema["$defs"]["Specialist"])
    specialist.pop("required", None)
    specialist["properties"].pop("name", None)
    specialist["title"] = "SpecialistDefaults"
    schema["$defs"]["SpecialistDefaults"] = specialist
    schema["properties"]["defaults"] = {
        "anyOf": [{"$ref": "#/$defs/SpecialistDefaults"}, {"type": "null"}],
        "description": schema["properties"]["defaults"].get("description", ""),
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Cadre pipelines.yaml"
    return schema
