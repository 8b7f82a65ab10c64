"""Tiny random-weight mlx-lm model directories, built on the fly for tests.

Tests cannot download models (no Hugging Face hub access), so this module
writes a complete, loadable mlx-lm model directory from scratch:

* ``config.json``            -- a real ``llama`` or ``qwen2`` config
* ``model.safetensors``      -- seeded random float32 weights (optionally 4-bit)
* ``tokenizer.json``         -- a byte-level BPE trained on a built-in text
* ``tokenizer_config.json``  -- ChatML chat template and special tokens

Every linear dimension is a multiple of 64 and ``head_dim`` is 64, so 4-bit
weight quantization and KV-cache quantization (both group size 64) work on
these models exactly as on real ones.

Usage::

    from tiny_models import build_tiny_model, tiny_model_dir

    path = build_tiny_model(tmp_path / "m", "qwen2", seed=1, quantize=True)
    model, tokenizer = mlx_lm.load(str(path))

    # in a pytest fixture: one shared build per (arch, quantize) per session
    @pytest.fixture(scope="session")
    def llama_dir(tmp_path_factory):
        return tiny_model_dir(tmp_path_factory, "llama")
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

__all__ = ["ARCHS", "build_tiny_model", "tiny_model_dir", "train_tokenizer"]

# -- Model shapes ------------------------------------------------------------

VOCAB_SIZE = 1024  # tokenizer target size; the model vocab is padded to 64s
HIDDEN = 256
HEADS = 4  # head_dim = 256 / 4 = 64 (KV-cache quantization groups are 64)
KV_HEADS = 2  # grouped-query attention, like most real models
INTERMEDIATE = 512
LAYERS = 2
INIT_STD = 0.02  # GPT-style init: logits vary, but no token dominates

# Architecture-specific config keys. llama gets an untied lm_head and qwen2 a
# tied one (plus q/k/v biases, which ModelArgs implies), so tests exercise
# both output-projection paths.
_ARCH_CONFIG = {
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "head_dim": HIDDEN // HEADS,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}
ARCHS = tuple(_ARCH_CONFIG)

# -- Tokenizer ---------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few paragraphs of plain English: enough merges for a ~1k-token BPE whose
# tokens look like real sub-words. Changing this text changes every tokenizer.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles
begins with a single step. In the beginning there was only the river, and the
people who lived beside it learned to read its moods: when it ran high in the
spring they moved their houses up the hill, and when it ran low in the late
summer they planted beans and squash in the rich mud it left behind.

Language models predict the next token from the tokens that came before it.
During decoding the model reads one new token at a time, looks back at every
earlier token through its key and value cache, and writes out a probability
for each word in its vocabulary. Sampling picks one of those words, and the
process repeats until the answer is complete or a stop token appears.

Benchmarks measure how quickly this happens. The prompt is processed first, in
one large batch, which is called prefill; then tokens are generated one by one,
which is called decode. Prefill is limited by arithmetic, while decode is
usually limited by how fast the weights can be read from memory. Quantization
stores each weight in fewer bits, so there is less memory to read and the
model runs faster, at the cost of a small loss in accuracy.

Hello! How are you today? I am fine, thank you. What would you like to talk
about? Tell me a story about a small robot who wanted to see the ocean. Once
upon a time, in a quiet workshop near the mountains, a little robot named Pip
woke up and looked out of the window. Far away, beyond the fields and forests,
the sea was shining in the morning light. Pip packed a bag with spare batteries,
a map, and a notebook, and set off down the long and winding road.

Cooking is a kind of chemistry. When onions are fried slowly in butter, their
sugars turn brown and sweet; when bread dough rests in a warm kitchen, yeast
breathes out bubbles of gas that make it rise. A good cook tastes everything,
adjusts the salt, and knows that patience often matters more than a recipe.

Weather changes from hour to hour. Clouds gather over the western hills, the
wind picks up, and by evening heavy rain is drumming on the roof. Tomorrow the
forecast promises clear skies, cold mornings, and bright afternoons, perfect for
walking through the park, cycling along the canal, or visiting the museum.

Software engineers write tests so that changes do not silently break working
code. A failing test should explain clearly what went wrong: which input was
used, what output was expected, and what actually happened. Small, fast,
deterministic tests are easier to trust than large, slow, flaky ones.

Numbers and symbols matter too: 1, 2, 3, 10, 42, 100, 2024, 3.14159; (a + b) * c
= d / e - f; "quoted words", 'single quotes', user@example.com, path/to/file.py,
x = [i ** 2 for i in range(10)], if x > 0: return True else: return False.
"""


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train a deterministic byte-level BPE ``tokenizers.Tokenizer``.

    Byte-level BPE (as in GPT-2, Llama 3, Qwen) encodes any string losslessly,
    so round-trips work for text far outside the training paragraphs. The
    special tokens come first, so ids 0..2 are <|endoftext|>, <|im_start|>,
    <|im_end|>. The result may be smaller than ``vocab_size`` if the text runs
    out of pairs to merge; never larger.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, even those absent from the text.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    return tokenizer


def _write_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Write tokenizer.json + tokenizer_config.json; return the vocab size.

    The returned size is a multiple of 64 and equals the tokenizer's size.
    A random model samples every id in its vocabulary, and mlx-lm's streaming
    detokenizer raises on ids the tokenizer does not know, so any gap between
    the trained size and the padded model vocab is filled with reserved special
    tokens (as Llama 3 does). With the built-in text the BPE reaches
    VOCAB_SIZE and no filler is needed.
    """
    tokenizer = train_tokenizer(vocab_size)
    n_trained = tokenizer.get_vocab_size()
    padded = -(-n_trained // 64) * 64
    tokenizer.add_special_tokens(
        [f"<|reserved_{i}|>" for i in range(padded - n_trained)]
    )
    assert tokenizer.get_vocab_size() == padded
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        # Explicit class: without it transformers picks one from config.json's
        # model_type (e.g. LlamaTokenizer), which would rebuild the tokenizer
        # with its own pre-tokenizer instead of using tokenizer.json as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # ChatML models (Qwen) prepend nothing
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    with open(out_dir / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return padded


# -- Model -------------------------------------------------------------------


def _model_config(arch: str, vocab_size: int, eos_token_id: int) -> dict:
    """Full config.json contents (every ModelArgs field mlx-lm reads)."""
    if arch not in _ARCH_CONFIG:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_traditional": False,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        **_ARCH_CONFIG[arch],
    }


def _init_weights(model: nn.Module) -> None:
    """Re-draw every weight matrix from N(0, INIT_STD^2).

    An explicit normal init keeps the logits small and spread out: sampling
    gives varied tokens, and greedy decoding is still well defined (no exact
    ties). Vectors keep mlx's construction-time init (norm scales 1, small
    uniform q/k/v biases for qwen2).
    """

    def draw(p: mx.array) -> mx.array:
        return mx.random.normal(p.shape) * INIT_STD if p.ndim == 2 else p

    model.update(tree_map(draw, model.parameters()))
    mx.eval(model.parameters())


def build_tiny_model(
    out_dir: Path, arch: str = "llama", *, seed: int = 0, quantize: bool = False
) -> Path:
    """Write a tiny random-weight mlx-lm model directory and return its path.

    Args:
        out_dir: directory to create (or fill); existing files are overwritten.
        arch: "llama" or "qwen2" (real mlx-lm architectures).
        seed: weight seed; the same seed always gives identical weights.
        quantize: store linear and embedding layers as 4-bit affine
            (group size 64) with the matching "quantization" config entry, so
            ``mlx_lm.load`` rebuilds them as ``nn.QuantizedLinear`` (and
            ``nn.QuantizedEmbedding``).

    The model has 2 layers, hidden 256, 4 query / 2 KV heads of dim 64,
    intermediate 512 and a 1024-token vocabulary: 1.71M parameters for llama
    (untied lm_head), 1.44M for qwen2 (tied). Building takes ~0.1 s.
    """
    from mlx_lm.utils import save_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    vocab_size = _write_tokenizer(out_dir, VOCAB_SIZE)
    config = _model_config(arch, vocab_size, SPECIAL_TOKENS.index("<|im_end|>"))

    arch_module = importlib.import_module(f"mlx_lm.models.{arch}")
    # Seed before construction: the layers draw their default init (e.g. the
    # qwen2 biases) from the global mlx generator.
    mx.random.seed(seed)
    model = arch_module.Model(arch_module.ModelArgs.from_dict(config))
    _init_weights(model)

    if quantize:
        # Same layer choice and config keys as `mlx_lm.convert -q`.
        quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
        nn.quantize(model, group_size=64, bits=4, mode="affine")
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    save_config(config, out_dir / "config.json")
    return out_dir


# -- pytest helper -----------------------------------------------------------

_CACHE: dict[tuple[str, bool], Path] = {}


def tiny_model_dir(tmp_path_factory, arch: str = "llama", quantize: bool = False) -> Path:
    """Session-cached ``build_tiny_model`` (seed 0) for pytest fixtures.

    ``tmp_path_factory`` is pytest's session-scoped fixture; each
    (arch, quantize) pair is built once per test session and shared, so
    tests must not modify the returned directory.
    """
    key = (arch, quantize)
    if key not in _CACHE:
        name = f"tiny-{arch}{'-4bit' if quantize else ''}"
        _CACHE[key] = build_tiny_model(tmp_path_factory.mktemp(name), arch, quantize=quantize)
    return _CACHE[key]
