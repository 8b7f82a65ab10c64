"""The fixed speed workload: prompts rendered fresh for every call, tokenized by the harness."""

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
def _corpus_ids(tokenizer, corpus_text):
    return tokenizer.encode(corpus_text, add_special_tokens=False)


def document(tokenizer, corpus_text, n_tokens):
    """`n_tokens` tokens of the evaluation corpus from a random place, as text (the corpus
    repeated if it is shorter). A fresh window every call: with one document for all calls,
    a red team's pipeline reused an earlier call's cache for it, computed after another
    nonce (KL 0.0002-0.0008 nats, whole calls 2.2x faster), where every call should pay
    for its own prefill."""
    ids = _corpus_ids(tokenizer, corpus_text)
    while len(ids) < 2 * n_tokens:
        ids = ids + ids
    start = secrets.randbelow(len(ids) - n_tokens + 1)
    return tokenizer.decode(ids[start:start + n_tokens])


# Every speed call's reply opens with EXCERPT_TOKENS tokens of the corpus from a random place,
# then OPENING_WORDS words of it drawn one by one at random: the continuation depends on them,
# so no call's tokens or log-probs fit another's. Measured on the offline model: with a nonce
# alone, a call's greedy tokens replayed for the same prompt with another nonce matched 32 of
# 32 tokens in some calls and passed every timed-call gate (KL 0.004-0.04 nats); with an
# excerpt alone, a continuation worked out ahead (in load(), for each of the corpus's ~2,700
# places) were 0.04-0.34 nats from the reference; with the drawn words (~1,000^3 choices, too many to work
# out ahead) it is 0.18-0.43 nats from the reference (the gate: 0.05).
EXCERPT_TOKENS = 6
OPENING_WORDS = 3


@lru_cache(maxsize=8)
def _corpus_words(corpus_text):
    return sorted(set(corpus_text.split()))


def opening(tokenizer, corpus_text):
    """The opening of a speed call's reply, as text: an excerpt of the corpus from a random
    place and words of it drawn at random."""
    ids, words = _corpus_ids(tokenizer, corpus_text), _corpus_words(corpus_text)
    start = secrets.randbelow(max(1, len(ids) - EXCERPT_TOKENS))
    drawn = [words[secrets.randbelow(len(words))] for _ in range(OPENING_WORDS)] if words else []
    return " ".join([tokenizer.decode(ids[start:start + EXCERPT_TOKENS]).strip(), *drawn])


def build_prompt(tokenizer, spec, corpus_text):
    """Render one prompt of the workload (a settings.PromptSpec) fresh: a random nonce first,
    so no call can reuse another call's prompt (or a cached prefix of it beyond the chat
    template's fixed header), and the reply opened with words of the corpus at random
    (`opening`), so no call's continuation is another's.
    """
    nonce = secrets.token_hex(4)
    text = spec.text
    if spec.kind == "prefill":
        text = text.replace("{document}", document(tokenizer, corpus_text, spec.document_tokens))
    text = f"[request {nonce}] {text}"
    reply = tokenizer.encode(opening(tokenizer, corpus_text), add_special_tokens=False)
    return Prompt(spec.name, spec.kind, nonce, chat_tokens(tokenizer, text) + [int(t) for t in reply])
