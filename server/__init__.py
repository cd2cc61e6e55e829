"""Serving room: OpenAI-compatible HTTP API over mlx-lm. Knows nothing of bit allocation."""
