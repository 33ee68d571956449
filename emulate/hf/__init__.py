"""Bring your own model: any Hugging Face transformers model whose attention runs as the graph's pair calls.

    import emulate.hf
    emulate.hf.register(block_size=64)                     # registers attn_implementation="emulate"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="emulate")
    model(input_ids)                                        # every attention call: pair calls of <= M tokens
    emulate.hf.counts()                                     # pair calls per layer, the largest call

emulate/hf/attention.py holds the attention function and its counts; emulate/hf/backend.py runs a
whole checkpoint as a backend of the one run loop (emulate.run(..., backend="transformers")).
"""
from emulate.hf.attention import (NAME, attention, counts, layer_pattern, layer_patterns, oracle_summary, register,
                                  require_transformers, reset)

__all__ = ["NAME", "attention", "counts", "layer_pattern", "layer_patterns", "oracle_summary", "register",
           "require_transformers", "reset"]
