"""The pieces of `cadre serve`: the llama.cpp engine, the team of specialists with hot swap, the HTTP API.

- `engine`: one GGUF base model in memory, LoRA adapters switched per request (`LoraEngine`).
- `team`: each specialist's champion program, index and adapter, swapped atomically when the
  registry's champions move (`Team`, `ChampionWatcher`).
- `protocol`: the OpenAI-compatible request and response shapes and error bodies.
- `app`: the FastAPI application (`create_app`).

`cadre.serving.server` assembles them; `cadre serve` runs it.
"""
