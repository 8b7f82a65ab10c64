"""Load the locked evaluation corpus (used for perplexity / KL-divergence checks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"


def load_corpus(path: Path | str | None = None) -> tuple[str, str]:
    """Return ``(text, sha256_hex)`` for the corpus file.

    The hash is taken over the raw bytes, so any edit to the file (even
    whitespace) shows up as a different corpus in the results.
    """
    data = Path(path if path is not None else CORPUS_PATH).read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
