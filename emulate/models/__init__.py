"""Models: the generic block, its presets and published shapes, and the loaders of checkpoints and GGUF files."""
