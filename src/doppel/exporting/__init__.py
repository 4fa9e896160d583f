"""Exporting a run for other runtimes: GGUF files with doppel's prompt format (llama.cpp, Ollama, LM Studio)."""
