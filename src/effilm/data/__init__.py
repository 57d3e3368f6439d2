"""Data: the one input reader, tokenizer, token shards, the staged loader, dedup and filters."""
