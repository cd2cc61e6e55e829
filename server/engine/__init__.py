"""The generation engine: one thread, continuous batching on mlx_lm's BatchGenerator."""
