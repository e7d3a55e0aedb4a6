"""Perplexity of the (edited) model on a text corpus: general ability after editing.

``exp(mean token NLL)`` over the first ``n_tokens`` tokens of the corpus (WikiText-2's
test split by default), cut into non-overlapping ``seq_len``-token windows, each scored on
its own (every token but a window's first is predicted; no stride, as in the usual
"non-overlapping chunks" evaluation, so the number is comparable across runs of one model
but higher than the sliding-window perplexity that model cards report). The runner logs it
as ``general/perplexity`` on the steps ``every`` picks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kaedit.models import LoadedModel
from kaedit.schedule import every_due
from kaedit.stats import read_corpus
from kaedit.tokens import chunks


@dataclass
class Perplexity:
    """A run's perplexity evaluation (``cfg.perplexity``); the windows are tokenised once."""

    corpus: Sequence[str]
    #: Tokens scored (first ``n_tokens`` of the corpus, in whole windows).
    n_tokens: int = 16_384
    seq_len: int = 512
    batch_size: int = 8
    #: 0: never; k: step 0, every k-th step and the last step; None: step 0 and the last.
    every: int | None = 0
    _windows: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every is not None and int(self.every) < 0:
            raise ValueError(f"perplexity.every={self.every} must be >= 0 (0 = never, "
                             "null = step 0 and the last step)")
        if int(self.seq_len) < 2 or int(self.n_tokens) < int(self.seq_len):
            raise ValueError(f"perplexity.n_tokens={self.n_tokens} must be >= "
                             f"perplexity.seq_len={self.seq_len} >= 2")
        self.corpus = [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)

    def due(self, step: int, n_steps: int) -> bool:
        return every_due(self.every, step, n_steps)

    def windows(self, tok) -> torch.Tensor:
        """``[n_windows, seq_len]`` token ids (tokenised on first use)."""
        if self._windows is None:
            text = read_corpus(self.corpus, "perplexity.corpus")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            n = min(int(self.n_tokens), len(ids)) // int(self.seq_len)
            if n == 0:
                raise ValueError(f"perplexity.corpus has fewer than seq_len={self.seq_len} "
                                 "tokens")
            self._windows = torch.tensor(ids[: n * int(self.seq_len)]).view(n, -1)
        return self._windows

    @torch.inference_mode()
    def __call__(self, lm: LoadedModel) -> float:
        windows = self.windows(lm.tokenizer)
        total, count = 0.0, 0
        for sl in chunks(len(windows), int(self.batch_size)):
            ids = windows[sl].to(lm.device)  # [b, seq_len]
            logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                  ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
        return math.exp(total / count)
