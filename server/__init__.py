"""Serving room: OpenAI-compatible HTTP API over mlx-lm. Knows nothing of metrics or bit allocation."""
