"""Where tensors come from: safetensors checkpoints, model resolution."""
