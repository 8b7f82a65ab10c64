"""Tests for harness.models: model resolution and offline GGUF -> mlx-lm conversion.

The fast tests need no network. The real-model tests share one module-scoped
fixture that resolves the offline SmolLM2-135M-Instruct model once (downloaded
from PyPI and converted on first use, then reused from the cache; set
MLX_HILLCLIMB_CACHE to choose the cache directory).
"""

import hashlib
import json
import math
import os

# Compilation only adds start-up time for these short runs; must be set before mlx_lm is imported.
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import pytest  # noqa: E402

from harness.models import (  # noqa: E402
    OFFLINE_MODELS,
    ModelError,
    cache_dir,
    convert_gguf,
    resolve_model,
    verify_sha256,
)

OFFLINE_NAME = "smollm2-135m-instruct"


def assert_one_line(err: ModelError) -> str:
    message = str(err)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------
# Fast tests: no download
# ---------------------------------------------------------------------------


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_HILLCLIMB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_HILLCLIMB_CACHE")
    assert cache_dir().name == "mlx-hillclimb"


def test_offline_models_spec_is_complete():
    spec = OFFLINE_MODELS[OFFLINE_NAME]
    assert spec["wheel"].endswith(".whl") and spec["gguf"].endswith(".gguf")
    assert len(spec["sha256"]) == 64


def test_unknown_name_lists_offline_models():
    with pytest.raises(ModelError) as info:
        resolve_model("nonsense", progress=lambda _: None)
    message = assert_one_line(info.value)
    assert OFFLINE_NAME in message and "nonsense" in message


def test_missing_local_directory(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ModelError) as info:
        resolve_model(str(missing), progress=lambda _: None)
    assert str(missing) in assert_one_line(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as info:
        resolve_model(str(tmp_path), progress=lambda _: None)
    assert "config.json" in assert_one_line(info.value)


def test_local_directory_with_config_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), progress=lambda _: None) == tmp_path


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(ModelError) as info:
        resolve_model(str(f), progress=lambda _: None)
    assert "not a model directory" in assert_one_line(info.value)


def test_checksum_verification(tmp_path):
    f = tmp_path / "fake.whl"
    f.write_bytes(b"not really a wheel")
    good = hashlib.sha256(b"not really a wheel").hexdigest()
    verify_sha256(f, good)  # matching digest: no error
    with pytest.raises(ModelError) as info:
        verify_sha256(f, "0" * 64)
    message = assert_one_line(info.value)
    assert "checksum mismatch" in message and good in message


def test_unsupported_gguf_architecture(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    mx.save_gguf(str(gguf), {"token_embd.weight": mx.zeros((4, 8))}, {"general.architecture": "gpt2"})
    out = tmp_path / "out"
    with pytest.raises(ModelError) as info:
        convert_gguf(gguf, out)
    assert "unsupported GGUF architecture 'gpt2'" in assert_one_line(info.value)
    assert not out.exists()


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelError) as info:
        convert_gguf(bad, tmp_path / "out")
    assert "could not read GGUF" in assert_one_line(info.value)


def test_hub_id_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads these at import time, so set the module values as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = "mlx-community/definitely-not-cached-model-4bit"
    with pytest.raises(ModelError) as info:
        resolve_model(repo, progress=lambda _: None)
    message = assert_one_line(info.value)
    assert f"could not download {repo} from the Hugging Face hub" in message
    assert "check the network" in message


# ---------------------------------------------------------------------------
# Real model: one download + conversion per session (reused from the cache after that)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_dir():
    return resolve_model(OFFLINE_NAME)


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    import mlx_lm

    return mlx_lm.load(str(smollm_dir))


def test_offline_model_directory(smollm_dir):
    assert smollm_dir == cache_dir() / "models" / OFFLINE_NAME
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    # Published atomically: no scratch or half-converted directories left beside it.
    leftovers = [p.name for p in smollm_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_offline_model_is_reused(smollm_dir):
    messages = []
    assert resolve_model(OFFLINE_NAME, progress=messages.append) == smollm_dir
    assert messages == []  # nothing downloaded or converted the second time


def test_convert_refuses_existing_output(smollm_dir, tmp_path):
    with pytest.raises(FileExistsError):
        convert_gguf(tmp_path / "unused.gguf", smollm_dir)


def test_tokenizer_round_trips(smollm):
    _, tokenizer = smollm
    samples = [
        "Hello, world!",
        "The year 2024 had 366 days.",
        "Ünïcödé — naïve café, 日本語, emoji 😀🚀",
        "def f(x):\n\treturn x  *  2\n\n",
        "<|im_start|>user\nhi there<|im_end|>\n",
    ]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Control tokens are single special tokens, not BPE pieces.
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.bos_token == "<|im_start|>"


PARAGRAPHS = [
    "The town library opens at nine o'clock every morning. On weekdays it is "
    "usually quiet, with a few students reading at the long wooden tables and "
    "older residents looking through the newspapers. On Saturdays, families "
    "come in to borrow picture books, and the children's room becomes the "
    "busiest part of the building.",
    "Water boils at one hundred degrees Celsius at sea level. At higher "
    "altitudes the air pressure is lower, so water boils at a lower "
    "temperature. This is why cooking pasta or rice can take longer in the "
    "mountains than it does near the coast.",
    "Many people enjoy walking in the park after dinner. The fresh air helps "
    "them relax, and a short walk is good for their health. Some bring their "
    "dogs, while others simply listen to music or talk with friends as the "
    "sun goes down.",
]


def test_perplexity_is_sane(smollm):
    model, tokenizer = smollm
    total_nll, total_tokens = 0.0, 0
    for text in PARAGRAPHS:
        ids = mx.array([tokenizer.encode(text)])
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += ids.shape[1] - 1
    perplexity = math.exp(total_nll / total_tokens)
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity: {perplexity:.2f} over {total_tokens} tokens")
    # A correct conversion scores in the tens; a broken one (e.g. q/k rows left in
    # llama.cpp's RoPE order) scores far higher.
    assert 3 < perplexity < 50


def test_greedy_chat_answer_is_coherent(smollm):
    import mlx_lm

    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=40)
    print(f"chat answer: {answer!r}")
    assert "Paris" in answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
