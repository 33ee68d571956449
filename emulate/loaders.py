"""Where a model comes from: a preset name or a Hugging Face checkpoint directory."""
from __future__ import annotations

from pathlib import Path

from emulate.config import EmulateError
from emulate.presets import PRESETS, preset


def load_model(name: str, seed: int = 0):
    """(config, weights, tokenizer.json path or None) for a preset name or a checkpoint directory."""
    if name in PRESETS:
        config, weights = preset(name, seed=0)  # preset weights are fixed; --seed draws the input
        return config, weights, None
    path = Path(name)
    if path.is_dir():
        from emulate.checkpoints import load_checkpoint

        return load_checkpoint(path)
    raise EmulateError(f"unknown preset {name!r} and no such checkpoint directory (presets: {', '.join(PRESETS)})")
