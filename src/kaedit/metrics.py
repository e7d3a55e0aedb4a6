"""Metrics of generated text: ROME's CounterFact fluency and consistency. Pure functions.

Both follow ROME's evaluation code (Meng et al. 2022a, ``experiments/py/
eval_utils_counterfact.py``); the runner reports them x100, as the papers' tables do.

* **Fluency** (ROME "ngram_entropy", "generation entropy"): for one text, the Shannon
  entropy **in bits** of the frequency distribution of its word 2-grams (H₂) and 3-grams
  (H₃), weighted by 2/3 and 4/3 and *averaged*: ``(2/3·H₂ + 4/3·H₃) / 2``. A request's
  fluency is the arithmetic mean over its generations (GPT-J unedited: 6.22, shown as 622).
  Words come from NLTK's Treebank word tokenizer (the one ``nltk.word_tokenize`` uses);
  ROME first splits sentences with NLTK's Punkt model, which needs a data download, so
  here sentences are split after ``.``/``!``/``?`` followed by whitespace (the two
  differ only where Punkt knows an abbreviation, e.g. "Mr.").
* **Consistency** (ROME "reference_score"): cosine similarity of the TF-IDF vectors of two
  texts (all generations about the subject joined by spaces, and the reference text about
  the new object), with scikit-learn's ``TfidfVectorizer`` defaults (lower-cased
  ``\\b\\w\\w+\\b`` tokens, raw counts x idf, L2 norm). ROME's vectorizer is rebuilt from
  its ``idf.npy`` + ``tfidf_vocab.json`` by :func:`rome_vectorizer`; :func:`fit_vectorizer`
  fits one on a corpus instead. A text with no vocabulary word has similarity 0 (ROME's
  code divides by a zero norm there).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

#: ROME's n-gram orders and their weights in the fluency average.
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_HEADING = re.compile(r"^\s*=.*=\s*$")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation of ``text``: Treebank rules, sentence by sentence."""
    from nltk.tokenize import word_tokenize

    return [t for s in _SENTENCE_BREAK.split(text) if s.strip()
            for t in word_tokenize(s, preserve_line=True)]


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution: −Σ f log₂ f (0 if none)."""
    # the n shifted copies differ in length: zip stops at the last full n-gram
    counts = Counter(zip(*(tokens[i:] for i in range(n)), strict=False))
    if not counts:
        return 0.0
    freqs = np.array(list(counts.values()), dtype=float)
    freqs /= freqs.sum()
    return float(-(freqs * np.log2(freqs)).sum())


def text_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS,
                 weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's weighted n-gram entropy of one text: mean of ``w_n · H_n``."""
    tokens = word_tokens(text)
    terms = [w * ngram_entropy(tokens, n) for n, w in zip(orders, weights, strict=True)]
    return float(np.mean(terms))


def fluency(texts: Sequence[str]) -> float:
    """Mean :func:`text_entropy` of a request's generations (NaN without any)."""
    return float(np.mean([text_entropy(t) for t in texts])) if texts else math.nan


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors; 0 when either is all zeros."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


def tfidf_similarity(text_a: str, text_b: str, vectorizer) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts (ROME's ``tfidf_similarity``)."""
    enc = vectorizer.transform([text_a, text_b]).toarray()
    return cosine(enc[0], enc[1])


def rome_vectorizer(idf: np.ndarray, vocab: Mapping[str, int]):
    """A ``TfidfVectorizer`` with ROME's fixed vocabulary and idf weights (default settings)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    idf = np.asarray(idf, dtype=float)
    if len(idf) != len(vocab):
        raise ValueError(f"TF-IDF idf has {len(idf)} entries but the vocabulary {len(vocab)}")
    vec = TfidfVectorizer(vocabulary=dict(vocab))
    vec.idf_ = idf
    return vec


def fit_vectorizer(documents: Iterable[str]):
    """A ``TfidfVectorizer`` (default settings, as ROME's) fitted on ``documents``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer().fit(list(documents))


def paragraphs(text: str) -> list[str]:
    """WikiText as TF-IDF documents: its non-empty lines, without ``= Heading =`` lines."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not _HEADING.match(line)]
