"""The prefix cache: KV states of prompt prefixes, reused across requests."""
