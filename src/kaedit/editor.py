"""A Python editing API for notebooks, on the runner's own code path.

    ed = kaedit.Editor.from_overrides(["model=smollm2", "method=memit", "fusion=add"])
    ed.edit({"prompt": "{} plays the sport of", "subject": "LeBron James",
             "target_new": "football"})
    ed.evaluate(records)      # the run's evaluator: efficacy, generalization, ...
    ed.save("edited-model")   # a Hugging Face folder (kaedit.export.save_model)
    ed.reset()                # back to the unedited weights

The parts are built by :func:`kaedit.setup.build_session` from the same composed config
as ``python -m kaedit.run`` (model, statistics cache, method, fusion, evaluator), and each
:meth:`Editor.edit` is one step of the recipe, :func:`kaedit.experiment.edit_step`
(compute Δ → fuse → guard → apply), with the step's generator drawn as the runner draws
it. ``ed.model`` holds W₀ + the sum of applied deltas; evaluation and saving use the
weights the fusion serves (the same for every fusion but Lookahead and WiSE-FT), and
``with ed.serving():`` gives them to your own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kaedit.errors import ConfigError
from kaedit.records import EditRequest

#: A request as :meth:`Editor.edit` accepts it.
RequestLike = EditRequest | Mapping[str, Any]


def to_request(item: RequestLike, index: int) -> EditRequest:
    """An :class:`EditRequest` from a record, a ROME CounterFact row (``requested_rewrite``)
    or a plain dict ``{"prompt", "subject", "target_new"[, "target_true"]}``; a prompt
    without ``{}`` is a sentence whose first occurrence of the subject becomes ``{}``."""
    from kaedit.data import counterfact
    from kaedit.data.fields import DatasetError, template, texts

    if isinstance(item, EditRequest):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(f"request {index}: expected an EditRequest or a dict, got "
                          f"{type(item).__name__}")
    if "requested_rewrite" in item:
        return counterfact.from_rome(item, index)
    missing = [k for k in ("prompt", "subject", "target_new") if not item.get(k)]
    if missing:
        raise DatasetError(f"request {index}: missing {missing}; a request needs 'prompt' "
                           "(with '{}' for the subject), 'subject' and 'target_new'")
    prompt, subject = str(item["prompt"]), str(item["subject"])
    where = f"request {index}"
    if "{}" not in prompt:
        prompt = template(prompt, subject, where, "prompt")
    elif prompt.count("{}") != 1:
        raise DatasetError(f"{where}: prompt {prompt!r} must hold exactly one '{{}}'")
    true = item.get("target_true", item.get("ground_truth"))
    return EditRequest(
        case_id=str(item.get("case_id", f"edit-{index}")), subject=subject, prompt=prompt,
        target_new=str(item["target_new"]), target_true=None if true is None else str(true),
        paraphrase_prompts=texts(item, "paraphrase_prompts", where),
        neighborhood_prompts=texts(item, "neighborhood_prompts", where),
    )


def to_requests(items: RequestLike | Iterable[RequestLike], start: int = 0) -> list[EditRequest]:
    if isinstance(items, (EditRequest, Mapping)):
        items = [items]
    return [to_request(x, start + i) for i, x in enumerate(items)]


class Editor:
    """Sequential editing of one model, step by step, as ``python -m kaedit.run`` does."""

    def __init__(self, cfg: DictConfig) -> None:
        from kaedit.setup import build_session

        # the runner's session without its plan (records, schedule, run evaluation)
        self.session = s = build_session(cfg, plan=False)
        self.cfg, self.seed, self.lm, self.stats = s.cfg, s.seed, s.lm, s.stats
        self.method, self.ctx, self.fusion = s.method, s.ctx, s.fusion
        self.evaluator, self.scorer = s.evaluator, s.scorer
        self._initial_method_state = self.method.state_dict()
        self._weights = s.edits
        self.fusion_state = self.fusion.init_state()
        #: Steps made (each :meth:`edit` call is one), and the requests applied so far.
        self.step = 0
        self.requests: list[EditRequest] = []
        #: ``{"step", "reason"}`` of steps the guard did not apply.
        self.faults: list[dict[str, Any]] = []

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = ()) -> Editor:
        """Compose ``conf/config.yaml`` with ``overrides`` (as on the command line) and build.
        The tracker is not used; the cache is the run's (``cache_dir``)."""
        from kaedit.setup import compose

        return cls(compose(list(overrides)))

    @property
    def model(self) -> nn.Module:
        return self.lm.model

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @contextlib.contextmanager
    def serving(self) -> Iterator[nn.Module]:
        """Inside the block the model holds the weights the fusion serves."""
        with self._weights.serving(self.fusion.served_offset(self.fusion_state)):
            yield self.lm.model

    def edit(self, requests: RequestLike | Iterable[RequestLike]) -> dict[str, Any]:
        """Edit ``requests`` in one step (one batch); returns what the step did."""
        from kaedit.experiment import edit_step

        batch = to_requests(requests, start=len(self.requests))
        if not batch:
            raise ConfigError("edit([]): no requests to edit")
        self.step += 1
        done = edit_step(self.method, self.ctx, self.fusion, self.fusion_state, self._weights,
                         batch, self.session.fusion_seed, self.step,
                         self.cfg.guard.max_delta_norm)
        self.fusion_state = done.fusion_state
        if done.problem is None:
            self.requests.extend(batch)
        else:
            self.faults.append({"step": self.step, "reason": done.problem})
            if self.cfg.guard.on_fault == "stop":
                raise FloatingPointError(f"step {self.step} not applied: {done.problem}")
        return {"step": self.step, "applied": done.problem is None, "problem": done.problem,
                "edited": sorted(done.fused), "time/compute_s": done.t_compute}

    def evaluate(self, records: RequestLike | Iterable[RequestLike] | None = None,
                 prefix: str = "eval") -> dict[str, float]:
        """The run's evaluator (``dataset.evaluator``) on ``records`` (default: every
        request applied so far) with the served weights: means x100 and ``score``."""
        from kaedit.evaluate import aggregate

        reqs = self.requests if records is None else to_requests(records)
        if not reqs:
            raise ConfigError("evaluate(): no records given and nothing edited yet")
        with self.serving():
            values = self.evaluator(self.scorer, reqs)
        return aggregate(values, prefix)

    def save(self, out: str | Path) -> Path:
        """The served model as a Hugging Face folder (``from_pretrained(out)`` loads it)."""
        from kaedit.export import save_model

        with self.serving():
            return save_model(self.lm, out)

    def reset(self) -> None:
        """Back to the unedited model: W₀, the fusion's and the method's initial state."""
        from kaedit.weights import EditedWeights, restore

        restore(self.lm.model, self._weights.base)
        self.session.edits = self._weights = EditedWeights(self.lm.model)
        self.fusion_state = self.fusion.init_state()
        self.method.load_state_dict(self._initial_method_state)
        self.step, self.requests, self.faults = 0, [], []
