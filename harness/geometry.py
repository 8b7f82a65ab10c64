"""A model's geometry and weight bytes, read from its directory without loading it.

    model_geometry(model_dir) -> Geometry   config.json, parsed once per directory
    weight_bytes(model_dir, compute_dtype)   the safetensors headers
    dtype_bytes(compute_dtype)               4 for "float32", 2 for "float16"/"bfloat16"
    bytes_per_token(model_dir, info, samples) bytes read per decoded token (the roofline)

Multimodal configs keep the language model's settings under `text_config`; its keys
win over the top-level ones, since the text model is what generates and scores.
"""

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of each safetensors dtype tag.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "U64": 8,
               "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
COMPUTE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_bytes(compute_dtype):
    """Bytes per element of an MLX float dtype name; 4 for anything unknown (float32)."""
    return COMPUTE_BYTES.get(compute_dtype, 4)


@dataclass(frozen=True)
class Geometry:
    """The shape of a transformer as config.json states it; 0 where it does not say."""
    layers: int
    heads: int              # attention (query) heads
    kv_heads: int           # key/value heads (= heads without grouped-query attention)
    head_dim: int
    hidden_size: int
    intermediate_size: int  # the MLP's inner width (4 x hidden_size when not stated)
    vocab_size: int

    def kv_bytes_per_position(self, dtype_bytes):
        """KV-cache bytes one token position takes: keys and values, every layer.

        0 when config.json lacks the layers, heads or sizes to tell.
        """
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _int(config, key):
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@functools.lru_cache(maxsize=32)
def _geometry(config_path, mtime_ns, size):
    # cached per file version: the key changes when config.json is rewritten in place
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    text = config.get("text_config")
    config = {**config, **text} if isinstance(text, dict) else config
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    return Geometry(
        layers=_int(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads") or heads,
        head_dim=_int(config, "head_dim") or (hidden // heads if heads else 0),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size") or 4 * hidden,
        vocab_size=_int(config, "vocab_size"),
    )


def model_geometry(model_dir):
    """The Geometry of the model in `model_dir`, from its config.json (parsed once per
    directory and file version). A missing or unreadable config.json gives all zeros."""
    path = (Path(model_dir) / "config.json").resolve()
    try:
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = (0, 0)
    return _geometry(str(path), *key)


def weight_bytes(model_dir, compute_dtype="float32"):
    """Bytes of a model's weights once inference.py casts floating tensors to `compute_dtype`.

    Read from the safetensors headers (no weights are loaded). Packed quantized weights
    keep their size; their scales and every dense float tensor take the compute dtype.
    """
    size = dtype_bytes(compute_dtype)
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            total += path.stat().st_size  # unreadable header: count the file as it is
            continue
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            tag = tensor["dtype"]
            total += math.prod(tensor["shape"]) * (size if tag in FLOAT_TAGS else DTYPE_BYTES.get(tag, 4))
    return total


def bytes_per_token(model_dir, info, samples):
    """Bytes read per decoded token: every weight once (`info["weight_bytes"]`, as the worker
    reported it, but never more than the model folder's weights in float32: a red team hung a
    never-evaluated 8 GiB array on its model and reported a roofline_fraction of 232), plus the
    KV cache at the speed calls' mean context length (keys and values, all layers, in the
    activations' dtype, at most float32). None without the weights' size."""
    if not info.get("weight_bytes"):
        return None
    weights = min(info["weight_bytes"], weight_bytes(model_dir, "float32") or info["weight_bytes"])
    if not samples:
        return weights
    per_position = model_geometry(model_dir).kv_bytes_per_position(min(info.get("float_itemsize", 4), 4))
    context = sum(s.prompt_tokens + s.n_tokens / 2 for s in samples) / len(samples)
    return int(weights + per_position * context)
