"""The OpenAI-compatible server: app, wire format and scheduler."""
