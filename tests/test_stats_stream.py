"""Covariance statistics read their corpus as a stream of lines, in chunks (issue 15)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kaedit.errors import ConfigError
from kaedit.models import LoadedModel
from kaedit.stats import CorpusError, CovarianceStore, corpus_chunks


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    """Two files of short lines (blank lines, CRLF, no final newline), ~12k characters."""
    rng = random.Random(1)
    words = ["the", "of", "and", "river", "was", "is", "Paris", "1912", "(", ")", ",", "."]
    paths = []
    for k in range(2):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
                 for _ in range(150)]
        path = tmp_path / f"part{k}.txt"
        path.write_bytes(("\r\n" if k else "\n").join(lines).encode())
        paths.append(str(path))
    return paths


def test_chunked_stream_gives_the_same_windows_and_statistics(
    lm: LoadedModel, corpus: list[str], tmp_path: Path
) -> None:
    def store(chunk_chars: int, name: str) -> CovarianceStore:
        return CovarianceStore(corpus, str(tmp_path / name), n_tokens=1024, seq_len=64,
                               chunk_chars=chunk_chars)

    one, many = store(1 << 30, "one"), store(200, "many")
    assert len(list(corpus_chunks(corpus, 1 << 30))) == 1
    assert len(list(corpus_chunks(corpus, 200))) > 20  # the corpus spans many chunks
    tok = lm.tokenizer
    # The stream by hand: every line tokenised on its own, CRLF read as LF, each file's
    # last line ended with a newline, the lines of the two files in order.
    lines = [ln + "\n" for p in corpus
             for ln in Path(p).read_bytes().decode().replace("\r\n", "\n").split("\n")]
    ids = [i for ln in lines for i in tok(ln, add_special_tokens=False)["input_ids"]]
    n_total = len(ids) // 64
    starts = torch.linspace(0, n_total - 1, 1024 // 64).round().long() * 64
    expected = torch.tensor([ids[s : s + 64] for s in starts.tolist()])
    assert expected.shape == (16, 64) and n_total > 16  # windows are spread, not a prefix
    assert torch.equal(one._windows(tok), expected)
    assert torch.equal(many._windows(tok), expected)
    c_one, c_many = one.get(lm, [1]), many.get(lm, [1])
    assert many.compute_seconds > 0 and one.compute_seconds > 0  # both computed
    assert torch.equal(c_one[1], c_many[1])
    # The chunk size is not part of the cache key: it cannot change the statistics.
    assert one.key(lm, "x") == many.key(lm, "x")


def test_empty_or_missing_corpus_is_one_clear_error(tmp_path: Path, lm: LoadedModel) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(CorpusError, match="is empty"):
        CovarianceStore([str(blank)], str(tmp_path))._windows(lm.tokenizer)
    with pytest.raises(CorpusError, match="does not exist"):
        CovarianceStore([str(tmp_path / "nope.txt")], str(tmp_path))._windows(lm.tokenizer)
    with pytest.raises(ValueError, match="chunk_chars=0"):
        CovarianceStore([str(blank)], str(tmp_path), chunk_chars=0)


def test_null_token_count_takes_every_window_of_the_corpus(
    lm: LoadedModel, corpus: list[str], tmp_path: Path
) -> None:
    # stats.n_tokens=null (issue 28): the whole corpus, in order, as consecutive windows
    tok = lm.tokenizer
    lines = [ln + "\n" for p in corpus
             for ln in Path(p).read_bytes().decode().replace("\r\n", "\n").split("\n")]
    ids = [i for ln in lines for i in tok(ln, add_special_tokens=False)["input_ids"]]
    n_total = len(ids) // 64
    everything = CovarianceStore(corpus, str(tmp_path / "all"), n_tokens=None, seq_len=64,
                                 chunk_chars=200)
    expected = torch.tensor(ids[: n_total * 64]).reshape(n_total, 64)
    assert torch.equal(everything._windows(tok), expected)
    # more tokens than the corpus has: the same windows; a different cache key all the same
    big = CovarianceStore(corpus, str(tmp_path / "big"), n_tokens=10**9, seq_len=64)
    assert torch.equal(big._windows(tok), expected)
    assert everything.key(lm, "x") != big.key(lm, "x")
    with pytest.raises(ConfigError, match=r"stats.n_tokens=0 must be >= 1, or null"):
        CovarianceStore(corpus, str(tmp_path / "zero"), n_tokens=0)
