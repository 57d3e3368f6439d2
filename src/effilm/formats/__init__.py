"""Model formats: effilm checkpoints, Hugging Face and GGUF layouts, and the one loader."""
