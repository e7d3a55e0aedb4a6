"""WikiText-style perplexity as a run's evaluation (general/perplexity in metrics.csv)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import FORWARD_REL, Compose, gamma, load_tiny
from kaedit import experiment
from kaedit.perplexity import Perplexity


def test_perplexity_is_exp_of_the_mean_token_nll(compose: Compose, tiny_corpus: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    ppl = Perplexity(corpus=[str(tiny_corpus)], n_tokens=300, seq_len=64, batch_size=2)
    value = ppl(lm)
    windows = ppl.windows(lm.tokenizer)
    assert windows.shape == (4, 64)  # 300 tokens -> 4 whole windows
    with torch.no_grad():  # transformers' own loss: mean NLL of the 63 predicted tokens
        outs = [lm.model(input_ids=w[None], labels=w[None]) for w in windows]
    losses = [float(o.loss) for o in outs]
    mean_nll = sum(losses) / len(losses)
    # ppl = exp(mean NLL): its relative error is the mean NLL's absolute error. Batched vs
    # one window: logits off by FORWARD_REL of their scale, so each NLL by ≤ 2·max|δz|;
    # and each side sums positive NLLs in float32 (126 a batch, 63 a window: ≤ γₙ of the
    # sum, any order). A wrong window or token shift changes the NLL by far more.
    zmax = max(float(o.logits.abs().max()) for o in outs)
    rel = 2 * FORWARD_REL * zmax + (gamma(2 * 63) + gamma(63)) * mean_nll
    assert value == pytest.approx(math.exp(mean_nll), rel=rel)
    assert 1 < value < 2 * len(lm.tokenizer)  # a random model: near the vocabulary size


def test_bad_perplexity_settings() -> None:
    with pytest.raises(ValueError, match=re.escape("perplexity.every")):
        Perplexity(corpus=["x"], every=-1)
    with pytest.raises(ValueError, match="n_tokens"):
        Perplexity(corpus=["x"], n_tokens=10, seq_len=64)


def test_run_logs_perplexity_when_asked(compose: Compose, tiny_run_overrides: list[str],
                                        tiny_corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose([*tiny_run_overrides, "schedule.n_edits=8", "schedule.batch_size=2",
                   "perplexity.every=3", f"perplexity.corpus=['{tiny_corpus}']",
                   "perplexity.n_tokens=256",
                   "perplexity.seq_len=64"])
    experiment.run(cfg, run_dir=str(run_dir))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    logged = metrics.dropna(subset=["general/perplexity"])["step"].tolist()
    assert logged == [0, 3, 4]  # step 0, every 3rd, the last (4 steps of 2 edits)
    values = metrics["general/perplexity"].dropna()
    assert (values > 1).all() and values.nunique() > 1  # the edits move it


def test_perplexity_is_off_by_default(compose: Compose, tiny_run_overrides: list[str],
                                      tmp_path: Path) -> None:
    assert compose(tiny_run_overrides).perplexity.every == 0
