"""SmolLM2 (slow): an exported run and an Editor-saved model load in plain transformers
and prefer the new object on the edited prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kaedit.experiment import compose, run
from kaedit.export import export

pytestmark = pytest.mark.slow


def log_probs(model, tok, prompt: str, targets: list[str]) -> list[float]:
    """Summed log P(target | prompt) per target, with plain transformers."""
    out = []
    for target in targets:
        ctx = tok(prompt)["input_ids"]
        full = tok(prompt + " " + target)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        out.append(float(sum(logp[i - 1, full[i]] for i in range(len(ctx), len(full)))))
    return out


def test_exported_smollm2_run_prefers_the_new_objects(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kaedit.setup import build_records

    cfg = compose(["logger=csv", "fusion=add", "schedule.n_edits=4", "schedule.batch_size=2",
                   "schedule.generation_every=0", "model.device=cpu"])
    run(cfg, run_dir=str(tmp_path / "run"))
    out = export(tmp_path / "run", tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base_dir = next((Path(str(cfg.cache_dir)).expanduser() / "models").glob("SmolLM2-*"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    edited = {f"model.layers.{layer}.mlp.down_proj.weight" for layer in cfg.model.edit.layers}
    b = dict(base.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, b[n])}
    assert changed == edited
    for r in build_records(cfg)[:4]:
        new, true = log_probs(model, tok, r.rewrite_prompt, [r.target_new, r.target_true])
        new0, _ = log_probs(base, tok, r.rewrite_prompt, [r.target_new, r.target_true])
        assert new > true, (r.case_id, new, true)
        assert new > new0
