"""kiln serve: an OpenAI-compatible HTTP server over the in-flight batching runtime."""
