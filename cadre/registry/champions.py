"""What a flow works from: the registered models of a specialist, its champion program, and how it serves now.

Flows download the champions (`tasks.prompts.fetch_champion_program`, `fetch_champion_adapter`) and pass
these small frozen values to the tasks that train on or evaluate what serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadre.config import ProgramSettings
    from cadre.runtime.base_model import BaseModelFiles
    from cadre.runtime.retrieval import IndexTarget


@dataclass(frozen=True)
class RegistryTarget:
    """The registered models of one specialist."""

    tracking_uri: str
    project: str
    specialist: str


@dataclass(frozen=True)
class ChampionProgram:
    """The serving program, downloaded: its version and local JSON."""

    version: str
    path: str
    fingerprint: str
    run_id: str | None


@dataclass(frozen=True)
class ServingSetup:
    """How a specialist serves now, as training data, preference pairs and adapter evaluations reproduce it.

    Attributes:
        program_settings: the declared program (`specialists[].program`).
        program: the champion program (None: the declared program serves).
        index: the live index it retrieves from (None: it does not retrieve).
        base: the base model's files.
        adapter_gguf: the champion LoRA adapter in GGUF form (None: the bare base model serves).
        adapter_version: that adapter's registry version.
        n_threads: llama.cpp decode threads.
        n_ctx: llama.cpp context window in tokens.
    """

    program_settings: ProgramSettings
    program: ChampionProgram | None
    index: IndexTarget | None
    base: BaseModelFiles
    adapter_gguf: str | None
    adapter_version: str | None
    n_threads: int
    n_ctx: int

    @property
    def program_path(self) -> str | None:
        """The champion program's JSON, or None for the declared program."""
        return self.program.path if self.program else None
