"""The runtime contract: how a case becomes a query and a prompt, and which model files answer it."""
