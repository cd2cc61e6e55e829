"""Quantization room: analysis, allocation, conversion, cache. Knows nothing of HTTP."""
