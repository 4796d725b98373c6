"""The deployable manifests, checked offline: the compose file against the Compose specification and against what
Cadre reads, the Kubernetes manifests and the Job our base job template renders against Kubernetes' own schemas."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from cadre.config.loader import PROJECT_VARIABLES

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
K8S = INFRA / "k8s" / "cadre.yaml"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
KNOWN_VARIABLES = {*PROJECT_VARIABLES, "CADRE_CONFIG"}


def _compose() -> dict:
    return YAML(typ="safe").load(COMPOSE.read_text())


def _k8s_documents() -> list[dict]:
    return [document for document in YAML(typ="safe").load_all(K8S.read_text()) if document]


def _rendered_job(**values) -> dict:
    """The Job manifest the Kubernetes worker makes from our base job template for a flow run (prefect-kubernetes'
    own configuration class; the server-side step that resolves block references has none to resolve here)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    variables = KubernetesWorkerJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    configuration = KubernetesWorkerJobConfiguration(
        **apply_values(copy.deepcopy(template["job_configuration"]), {**variables, **values})
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="calm-otter"))
    return configuration.job_manifest


def _validate(resource: dict) -> None:
    """Strict: a field Kubernetes does not know is an error (an API server with strict field validation refuses it)."""
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_compose_file_follows_the_compose_specification() -> None:
    from compose_spec import PyCompose

    PyCompose.from_yaml(COMPOSE.read_text())  # raises with the field, line and column otherwise
    with pytest.raises(ValueError, match="depends_on"):  # the check is real: a wrong condition is refused
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    depends_on: {b: {condition: soon}}\n")


def test_the_compose_file_hangs_together() -> None:
    """What the specification cannot know: references between services, files and Cadre's own settings."""
    compose = _compose()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        needs = service.get("depends_on", [])
        assert set(needs) <= set(services), (name, needs)
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(".") or source in volumes, (name, mount)
        if "build" in service:
            context = COMPOSE.parent / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), (name, service["build"])
        overrides = {key for key in service.get("environment", {}) if key.startswith("CADRE_")}
        assert overrides <= KNOWN_VARIABLES, f"{name} sets variables Cadre never reads: {overrides - KNOWN_VARIABLES}"
    mlflow = services["mlflow"]
    assert "pip install" not in str(mlflow["command"]), "packages are installed in the image, not at each start"
    bucket = re.search(r"--artifacts-destination s3://([\w-]+)", mlflow["command"]).group(1)
    assert f"store/{bucket}" in " ".join(services["minio-init"]["command"]), "nothing makes MLflow's bucket"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    vllm = services["vllm"]
    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] >= 1
    state_mount = next(m for m in vllm["volumes"] if m.startswith("state:")).split(":")[1]
    model = re.search(r"--model (\S+)", vllm["command"]).group(1)
    # The worker's state volume is /app/.cadre; the base model's safetensors are written at models/gemma3-270m/hf.
    assert model == f"{state_mount}/models/gemma3-270m/hf", model
    image = (INFRA / "compose" / "Dockerfile").read_text()
    assert "install-converter" in image and '".[k8s]"' in image


def test_every_kubernetes_manifest_is_valid() -> None:
    documents = _k8s_documents()
    for document in documents:
        _validate(document)
    kinds = {document["kind"] for document in documents}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Role", "RoleBinding"} <= kinds
    with pytest.raises(kubernetes_validate.ValidationError):  # the check is real: an unknown field is refused
        _validate({**documents[0], "spec": {"finalizers": ["kubernetes"], "replicas": 2}})


def test_the_base_job_template_renders_a_valid_job_that_runs_cadre() -> None:
    documents = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_documents()}
    template = json.loads(TEMPLATE.read_text())
    defaults = {key: spec.get("default") for key, spec in template["variables"]["properties"].items()}

    job = _rendered_job(gpu_count=1)
    _validate(job)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        container["image"]
        == documents[("Deployment", "cadre-worker")]["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    [settings] = container["envFrom"]
    assert ("ConfigMap", settings["configMapRef"]["name"]) in documents
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts == {"state": "/app/.cadre", "config": "/config"}
    assert ("PersistentVolumeClaim", volumes["state"]["persistentVolumeClaim"]["claimName"]) in documents
    config_path = documents[("ConfigMap", defaults["settings_config_map"])]["data"]["CADRE_CONFIG"]
    assert config_path == f"{mounts['config']}/pipelines.yaml" and volumes["config"]["configMap"]["name"]
    for document in documents.values():
        if document["kind"] == "ConfigMap":
            unknown = {k for k in document["data"] if k.startswith("CADRE_")} - KNOWN_VARIABLES
            assert not unknown, f"{document['metadata']['name']} sets variables Cadre never reads: {unknown}"
    assert job["metadata"]["namespace"] == documents[("Namespace", "cadre")]["metadata"]["name"]
    _validate(_rendered_job())  # the CPU flows: no GPU
