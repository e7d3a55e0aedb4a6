"""lm-eval-harness on an exported model with a local task (opt-in: needs ``lm_eval``).

lm-eval is not one of kaedit's dependencies; install it beside them
(``pip install lm-eval==0.4.13`` adds packages and changes none of the pinned ones) to run
this test. It exports a tiny run, runs a local multiple-choice task on the folder with
``lm_eval.simple_evaluate`` (what the ``lm_eval`` command calls) and checks its accuracy
against the exported model's own log-likelihoods.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import Compose
from kaedit import experiment
from kaedit.export import export

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval-harness is not installed "
                              "(pip install lm-eval==0.4.13)")

#: A local lm-eval task: the edited prompt, the true and the new object as two choices.
TASK = """task: kaedit_edits
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_runs_a_local_task_on_an_exported_model(
        compose: Compose, tiny_run_overrides: list[str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    cfg = compose([*tiny_run_overrides, "fusion=add"])
    experiment.run(cfg, run_dir=str(run_dir))
    out = export(run_dir, tmp_path / "exported")
    from kaedit.setup import build_records

    docs = [{"prompt": r.rewrite_prompt, "choices": [r.target_true, r.target_new], "label": 1}
            for r in build_records(cfg)[:6]]
    data = tmp_path / "tasks" / "edits.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks" / "kaedit_edits.yaml").write_text(TASK.format(data=data))

    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["kaedit_edits"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu",
        batch_size=2)
    acc = results["results"]["kaedit_edits"]["acc,none"]

    # the same comparison by hand: the summed log-probability of " " + choice
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)

    def logprob(context: str, cont: str) -> float:
        ctx, full = tok(context)["input_ids"], tok(context + " " + cont)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return float(sum(logp[i - 1, full[i]] for i in range(len(ctx), len(full))))

    wins = [logprob(d["prompt"], d["choices"][1]) > logprob(d["prompt"], d["choices"][0])
            for d in docs]
    assert acc == pytest.approx(sum(wins) / len(wins))
