"""The runtime contract: how a case becomes a query and a prompt, and which model files answer it.

Defined once and called by prompt optimization, training data, DPO pairs, evaluation and serving alike:

- `retrieval`: the retrieval query of a case, the search rule (index hits → passages), the index a specialist searches.
- `serving_prompt`: the serving program's instruction, demos and fields, read from its JSON.
- `prompt`: the prompt format itself (render, complete, parse).
- `base_model`: the base model's files (safetensors, GGUF, identity).
- `lm`: completion clients and the identity of the LM that answers.
"""
