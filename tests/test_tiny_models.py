"""Tests for tests/tiny_models.py: tiny random mlx-lm models load and generate."""

import os

# mx.compile traces add seconds per test on CPU and nothing here needs them.
# Must be set before mlx_lm is imported.
os.environ["MLX_DISABLE_COMPILE"] = "1"

import json  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
import pytest  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from tiny_models import ARCHS, build_tiny_model, tiny_model_dir  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog, and then naps!"


@pytest.fixture(scope="session", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def loaded(tmp_path_factory, arch):
    """(model, tokenizer) for the float32 model of each architecture."""
    return mlx_lm.load(str(tiny_model_dir(tmp_path_factory, arch)))


@pytest.fixture(scope="session")
def loaded_quantized(tmp_path_factory, arch):
    return mlx_lm.load(str(tiny_model_dir(tmp_path_factory, arch, quantize=True)))


def _linear_layers(model):
    """(name, module) for every Linear / QuantizedLinear in the model."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]


def _linear_dims(layer):
    """(input_dims, output_dims), unpacking a quantized weight's columns."""
    out_dims, in_cols = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_cols = in_cols * 32 // layer.bits  # uint32 holds 32/bits weights
    return in_cols, out_dims


def test_directory_layout(tmp_path_factory, arch):
    path = tiny_model_dir(tmp_path_factory, arch)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert "quantization" not in config
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["vocab_size"] % 64 == 0
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_config["chat_template"]


def test_session_cache_shares_one_build(tmp_path_factory, arch):
    assert tiny_model_dir(tmp_path_factory, arch) == tiny_model_dir(tmp_path_factory, arch)


def test_generate_20_tokens(loaded):
    model, tokenizer = loaded
    responses = list(mlx_lm.stream_generate(model, tokenizer, "Hello there", max_tokens=20))
    assert responses[-1].generation_tokens == 20
    assert responses[-1].finish_reason == "length"
    text = mlx_lm.generate(model, tokenizer, "Hello there", max_tokens=20)
    assert text == "".join(r.text for r in responses)  # greedy is deterministic
    assert text


def test_sampling_gives_varied_tokens(loaded):
    model, tokenizer = loaded
    sampler = make_sampler(temp=1.0)
    tokens = [
        r.token
        for r in mlx_lm.stream_generate(
            model, tokenizer, "Once upon a time", max_tokens=40, sampler=sampler
        )
    ]
    assert len(set(tokens)) > 10


def test_logits_not_degenerate(loaded):
    model, tokenizer = loaded
    logits = model(mx.array([tokenizer.encode(SENTENCE)]))
    assert logits.shape[-1] == model.args.vocab_size
    assert mx.std(logits[0, -1]).item() > 1e-3
    # Different contexts give different next-token distributions.
    assert not mx.allclose(logits[0, -1], logits[0, -2]).item()


def test_quantized_kv_cache(loaded):
    """head_dim 64 lets the KV cache quantize with group size 64."""
    model, tokenizer = loaded
    text = mlx_lm.generate(
        model, tokenizer, SENTENCE, max_tokens=10, kv_bits=4, kv_group_size=64, quantized_kv_start=0
    )
    assert isinstance(text, str)


def test_tokenizer_round_trip(loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode(SENTENCE)
    assert len(ids) < len(SENTENCE)  # BPE merged characters into sub-words
    assert tokenizer.decode(ids) == SENTENCE
    assert max(ids) < len(tokenizer.vocab)


def test_chat_template(loaded):
    _, tokenizer = loaded
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The ChatML markers are single special tokens, and <|im_end|> stops generation.
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == im_start and im_end in ids
    assert im_end in tokenizer.eos_token_ids


def test_linear_dims_multiple_of_64(loaded, loaded_quantized):
    for model in (loaded[0], loaded_quantized[0]):
        layers = _linear_layers(model)
        assert layers
        for name, layer in layers:
            in_dims, out_dims = _linear_dims(layer)
            assert in_dims % 64 == 0 and out_dims % 64 == 0, (name, in_dims, out_dims)


def test_quantized_variant(tmp_path_factory, arch, loaded_quantized):
    model, tokenizer = loaded_quantized
    config = json.loads(
        (tiny_model_dir(tmp_path_factory, arch, quantize=True) / "config.json").read_text()
    )
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    layers = _linear_layers(model)
    assert layers
    for name, layer in layers:
        assert isinstance(layer, nn.QuantizedLinear), name
        assert (layer.group_size, layer.bits) == (64, 4)
    responses = list(mlx_lm.stream_generate(model, tokenizer, "Hello there", max_tokens=20))
    assert responses[-1].generation_tokens == 20


def _weights(path):
    return mx.load(str(path / "model.safetensors"))


def test_seed_determinism(tmp_path):
    a = build_tiny_model(tmp_path / "a", "qwen2", seed=0)
    b = build_tiny_model(tmp_path / "b", "qwen2", seed=0)
    c = build_tiny_model(tmp_path / "c", "qwen2", seed=1)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
    assert not mx.array_equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"]).item()
    # The tokenizer does not depend on the seed at all.
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_model(tmp_path, "gpt2")
