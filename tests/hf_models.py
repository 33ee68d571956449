"""Small seeded Hugging Face checkpoints, one per family, built with transformers and saved to disk."""
from __future__ import annotations

import math

import torch
import transformers

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)

# family -> (model class, config class, config) of the checkpoints under test; each one exercises a mapping path
FAMILIES = {
    # explicit head_dim (4 x 32 != 64), attention and MLP biases, untied head
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
              dict(SMALL, head_dim=32, attention_bias=True, mlp_bias=True)),
    # a window shorter than N and not a multiple of M
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, dict(SMALL, sliding_window=40)),
    # QKV biases, tied head, layer 0 full and layer 1 sliding (max_window_layers = 1)
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
              dict(SMALL, use_sliding_window=True, sliding_window=48, max_window_layers=1, tie_word_embeddings=True)),
    # fused Conv1D c_attn, learned positions, gelu_new, tied head
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config,
             dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=None,
                  eos_token_id=None)),
    # post-norm encoder, segment embeddings, exact GELU
    "bert": (transformers.BertModel, transformers.BertConfig,
             dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=512, pad_token_id=None)),
}


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded values: transformers' init (norm weights 1, biases 0,
    std 0.02) would hide a swapped norm or bias and make attention nearly uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim == 1:  # norm weights around 1, biases around 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * z)
            else:
                p.copy_(z / math.sqrt(min(p.shape)))
    return model.eval()


def checkpoint(family: str, tmp_path, **overrides):
    """(transformers model, checkpoint directory) for one family, built and saved with seeded weights."""
    cls, config_cls, kwargs = FAMILIES[family]
    # sdpa, not eager: both take the same mask from transformers' masking_utils (they agree to 3e-6
    # in float32), but eager softmaxes in float32 for llama, mistral and qwen2, even in float64.
    model = seeded(cls._from_config(config_cls(**{**kwargs, **overrides}), attn_implementation="sdpa"))
    path = tmp_path / family
    model.save_pretrained(path)
    return model, path


def as_transformers(model) -> transformers.LlamaForCausalLM:
    """A llama-family emulate.Model (the smollm2-135m preset: its GGUF weights, dequantized) as
    transformers' LlamaForCausalLM in float32 with the same weights, for side-by-side runs."""
    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab, hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    # our canonical weight names (emulate/models/presets.py, weight_names) as LlamaForCausalLM's
    names = {"embed.tokens.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    inner = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
             "up": "mlp.up_proj", "down": "mlp.down_proj"}
    state = {}
    for key, w in model.weights.items():
        if key in names:
            state[names[key]] = w.float()
        else:
            _, layer, part, _ = key.split(".")
            state[f"model.layers.{layer}.{inner[part]}.weight"] = w.float()
    hf.load_state_dict(state, strict=True)
    return hf
