"""The fixed speed workload: prompts rendered with a fresh nonce, tokenized by the harness."""

import secrets
from dataclasses import dataclass
from functools import lru_cache


@dataclass
class Prompt:
    """One speed call's input, as the harness built it."""
    name: str
    kind: str          # "decode" or "prefill"
    nonce: str
    tokens: list       # prompt token ids, chat template applied


def chat_tokens(tokenizer, text):
    """Token ids of a single-turn chat asking `text`, ready for generation."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(text)]


@lru_cache(maxsize=8)
def document(tokenizer, corpus_text, n_tokens):
    """The evaluation corpus cut to `n_tokens` tokens, as text (repeated if it is shorter).

    Cached: every speed call of a run needs the same document, so it is built once.
    """
    ids = tokenizer.encode(corpus_text, add_special_tokens=False)
    while len(ids) < n_tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:n_tokens])


def build_prompt(tokenizer, spec, corpus_text):
    """Render one prompt of the workload (a settings.PromptSpec) with a fresh random nonce.

    The nonce comes first, so no call can reuse another call's prompt (or a cached
    prefix of it beyond the chat template's fixed header).
    """
    nonce = secrets.token_hex(4)
    text = spec.text
    if spec.kind == "prefill":
        text = text.replace("{document}", document(tokenizer, corpus_text, spec.document_tokens))
    text = f"[request {nonce}] {text}"
    return Prompt(spec.name, spec.kind, nonce, chat_tokens(tokenizer, text))
