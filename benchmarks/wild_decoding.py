"""WILD decoding (issue 27): the pool of ``kaedit.wild.greedy_pool`` against transformers'
``generate`` in fixed batches, on the prompts a WILD evaluation of CounterFact records asks.

One process, one torch thread. The unedited embedded model answers every distinct rewrite,
paraphrase and neighbourhood prompt of the first ``--n`` records twice:

- **generate**: batches of ``--generate-batch`` prompts sorted by length, left-padded,
  ``generate(do_sample=False, max_new_tokens=cap)`` with the WILD stop rule as a stopping
  criterion, each row cut at its first stop token (how kaedit decoded before the pool);
- **pool**: ``WildEval.answers`` with ``wild.batch_size`` rows (``--rows``).

It reports the wall time of each, the answers' lengths, and how many answers differ (the
pool's are meant to be the same tokens; a difference can only come from a near-tie of the
logits that padding and batch shape round differently). Writes
``benchmarks/results/<date>-<host>-wild.json`` and prints a Markdown table.

    python benchmarks/wild_decoding.py --n 100 --rows 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import time
from pathlib import Path

import numpy as np
import torch

from kaedit.setup import build_session, compose
from kaedit.tokens import pad
from kaedit.wild import WildEval


def generate_batches(w: WildEval, ids: list[tuple[int, ...]], batch: int) -> list[tuple]:
    """The answers of ``ids`` by ``generate`` in fixed, length-sorted batches."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):  # a row is done once its newest token stops it
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return torch.tensor([w.is_stop(int(t)) for t in input_ids[:, -1]])

    lm, out = w.lm, [()] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        inp, mask = pad([ids[r] for r in rows], lm.tokenizer.pad_token_id, lm.device, left=True)
        with torch.inference_mode():
            gen = lm.model.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                                    num_beams=1, max_new_tokens=int(w.max_new_tokens),
                                    pad_token_id=lm.tokenizer.pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([Stop()]))
        for b, r in enumerate(rows):
            out[r] = w.cut(gen[b, inp.shape[1]:].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="CounterFact records")
    ap.add_argument("--rows", type=int, default=128, help="the pool's rows (wild.batch_size)")
    ap.add_argument("--generate-batch", type=int, default=32,
                    help="generate's batch (the former wild.batch_size)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = compose(["method=memit", "logger=none", f"schedule.n_edits={args.n}",
                   f"schedule.batch_size={args.n}", *args.overrides])
    s = build_session(cfg)
    assert s.planned is not None
    w = WildEval(s.lm, every=1, max_new_tokens=cfg.wild.max_new_tokens, batch_size=args.rows,
                 stop_strings=cfg.wild.stop_strings)
    prompts = list(dict.fromkeys(p for r in s.planned for p in (
        r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts)))
    ids = [w._prompt(p) for p in prompts]

    t = time.perf_counter()
    pooled = w.answers(prompts)
    pool_s = time.perf_counter() - t
    t = time.perf_counter()
    generated = generate_batches(w, ids, args.generate_batch)
    generate_s = time.perf_counter() - t

    lengths = np.array([len(a) for a in generated])
    differ = sum(pooled[p] != g for p, g in zip(prompts, generated, strict=True))
    result = {
        "date": dt.date.today().isoformat(), "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(), "records": args.n,
        "distinct_prompts": len(prompts), "max_new_tokens": int(w.max_new_tokens),
        "mean_answer_tokens": float(lengths.mean()),
        "answers_at_cap": int((lengths == int(w.max_new_tokens)).sum()),
        "generate": {"batch": args.generate_batch, "seconds": round(generate_s, 1)},
        "pool": {"rows": args.rows, "seconds": round(pool_s, 1)},
        "speedup": round(generate_s / pool_s, 2), "answers_differing": int(differ),
    }
    out = Path(__file__).parent / "results" / f"{result['date']}-{result['host']}-wild.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| decoder | rows | s | s / prompt |\n|---|---|---|---|\n"
          f"| generate | {args.generate_batch} | {generate_s:.1f} | "
          f"{generate_s / len(prompts):.3f} |\n"
          f"| pool | {args.rows} | {pool_s:.1f} | {pool_s / len(prompts):.3f} |\n\n"
          f"{len(prompts)} distinct prompts, {lengths.mean():.1f} tokens per answer, "
          f"{result['answers_at_cap']} at the cap; {differ} answers differ. -> {out}")


if __name__ == "__main__":
    main()
