"""Knowledge: sources → chunks → embeddings → versioned vector index (re-index, backends)."""
