"""A specialist's champion parts as the registry names them now, as local files: what `cadre export` bundles.

The parts are found exactly as `cadre serve` finds them (`cadre.serving.team`): the champion versions behind the
aliases (`current_versions`), the program's JSON and the adapter's GGUF downloaded with `download_champion`, the base
GGUF from `base_gguf`, and the index version from this state dir when it holds it, else from the registered index
version's own table (downloaded once, as the server does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cadre.edge.bundle import BundleError, BundleParts, model_name

if TYPE_CHECKING:
    from cadre.config import CadreConfig


def champion_parts(config: CadreConfig, specialist: str) -> BundleParts:
    """The local files of the specialist's champions (downloaded from the registry where needed).

    Raises:
        BundleError: the program retrieves and no index is champion, an index version carries no table, or the
            champion adapter was trained on another base model than the specialist declares.
    """
    from mlflow import MlflowClient

    from cadre.knowledge.index import IndexLayout
    from cadre.registry.models import INDEX_STATE, download_version, model_settings
    from cadre.registry.versions import registered_model_name
    from cadre.runtime.base_model import base_gguf
    from cadre.serving.team import RegistrySource, current_versions, download_champion

    settings = config.specialist(specialist)
    source = RegistrySource(config.project.mlflow.uri, config.project.name, str(config.state_dir))
    retrieves = bool(settings.program.retrieve_k)
    registry = current_versions(source, specialist, retrieves)
    if retrieves and registry.index is None:
        raise BundleError(
            f"specialist {specialist!r} retrieves and has no champion index yet; run `cadre run reindex -s {specialist}`"
        )

    index_state_dir = None
    if registry.index is not None:
        if IndexLayout(config.state_dir, specialist).is_complete(registry.index) or registry.index_model is None:
            index_state_dir = config.state_dir
        else:
            name = registered_model_name(config.project.name, specialist, "index")
            folder = config.state_dir / "serving" / specialist / f"index-v{registry.index_model}"
            if model_settings(download_version(name, registry.index_model, folder, config.project.mlflow.uri)) is None:
                raise BundleError(
                    f"{name} v{registry.index_model} (index {registry.index}) was registered without its table and is "
                    f"not in {config.state_dir}; re-index (`cadre run reindex -s {specialist}`) and export again"
                )
            index_state_dir = folder / INDEX_STATE

    program_file = (
        download_champion(source, specialist, "program", registry.program, "program.json") if registry.program else None
    )
    adapter_file = (
        download_champion(source, specialist, "adapter", registry.adapter, ".gguf") if registry.adapter else None
    )
    adapter_base = None
    if adapter_file is not None:
        client = MlflowClient(config.project.mlflow.uri)
        version = client.get_model_version(
            registered_model_name(config.project.name, specialist, "adapter"), registry.adapter
        )
        adapter_base = version.tags.get("cadre.lineage.base_model") or settings.base_model
        if model_name(adapter_base) != settings.base_model:
            raise BundleError(
                f"the adapter champion v{registry.adapter} of {specialist!r} was trained on {adapter_base}, but the "
                f"specialist's base_model is {settings.base_model}; promote an adapter trained on it, or retire the "
                f"adapter (`cadre retire {specialist} adapter`)"
            )
    return BundleParts(
        specialist=specialist,
        program=settings.program,
        program_file=program_file,
        base_model=settings.base_model,
        base_gguf=Path(base_gguf(config, settings.base_model)),
        adapter_gguf=adapter_file,
        index_state_dir=index_state_dir,
        index_version=registry.index,
        search_mode=settings.index.search_mode,
        root=config.root,
        n_ctx=config.project.lm.n_ctx,
        embedding_batch_size=config.project.embedding.batch_size,
        lineage={
            "project": config.project.name,
            "tracking_uri": config.project.mlflow.uri,
            "program": registry.program,
            "adapter": registry.adapter if adapter_file is not None else None,
            "adapter_champion": registry.adapter,  # differs from `adapter` when the champion has no GGUF (serves base)
            "index": registry.index_model,
            "index_version": registry.index,
            "base_model": settings.base_model,
            "adapter_base_model": adapter_base,
        },
    )
