"""Seeded top-k sampling that gives the same draws on every device.

Used for MEMIT's context templates (:func:`kaedit.methods.templates.context_templates`) and for
the generations behind fluency and consistency (:class:`kaedit.evaluate.Generator`).
"""

from __future__ import annotations

import torch


class SeededTopK:
    """A ``generate`` logits processor that samples the next token itself, top-k from a
    seeded CPU generator, and leaves only that token finite so greedy decoding picks it.

    Sampling inside ``generate`` would draw from the device's RNG, so one seed would give
    different templates on CUDA and on the CPU (and, through them, different edits). The
    draws here are those ``generate(do_sample=True, top_k=k)`` makes on the CPU after
    ``torch.manual_seed(seed)``, on every device.
    """

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.detach().float().cpu()
        kth = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1).values[..., -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, -float("inf")), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -float("inf")).scatter_(-1, chosen, 0.0)
