"""The causal-tracing computation (ROME, Meng et al. 2022a §2.1; kmeng01/rome
``experiments/causal_trace.py``): settings, the traced prompts, the clean, corrupted and
restored forward passes of one record, and which records to trace. See
:mod:`kaedit.trace` for the method."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kaedit import hooks
from kaedit.errors import ConfigError
from kaedit.models import LoadedModel, ModelSpec
from kaedit.records import EditRequest
from kaedit.tokens import chunks, fill, lm_head, pad, target_ids

log = logging.getLogger(__name__)

#: State kinds and the ModelSpec module whose output is that state.
KINDS: dict[str, str] = {"residual": "layer", "mlp": "mlp_out", "attn": "attn_out"}
#: ROME's position classes, in the order of its figures.
POSITIONS: dict[str, str] = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_after": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}
SELECT = ("known", "all")

#: A restoration: the (module name, token index) pairs whose clean output is put back.
Restoration = frozenset[tuple[str, int]]


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TraceSettings:
    """``trace.*`` of ``conf/trace.yaml``; checked on construction."""

    n_records: int = 50
    #: ``known``: records whose true object's first token is the model's top-1 prediction
    #: (ROME); ``all``: the first ``n_records`` records whatever the model predicts.
    select: str = "known"
    samples: int = 10
    noise: float = 3.0
    window: int = 10
    kinds: tuple[str, ...] = tuple(KINDS)
    batch_size: int = 1024
    reuse_prefix: bool = True
    n_edit_layers: int | None = None

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        for key in ("n_records", "samples", "window", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"trace.{key}={value!r} must be a positive integer")
        if self.n_edit_layers is not None and (
            not isinstance(self.n_edit_layers, int) or self.n_edit_layers < 1
        ):
            raise ConfigError(
                f"trace.n_edit_layers={self.n_edit_layers!r} must be a positive integer or null "
                "(null: the length of model.edit.layers)"
            )
        if not (isinstance(self.noise, (int, float)) and self.noise > 0):
            raise ConfigError(
                f"trace.noise={self.noise!r} must be a positive number "
                "(a multiple of the subject embeddings' std; ROME: 3)"
            )
        if self.select not in SELECT:
            raise ConfigError(f"trace.select={self.select!r} is not one of {list(SELECT)}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(
                f"trace.kinds={list(self.kinds)!r}: expected a non-empty list of "
                f"distinct values from {list(KINDS)}"
            )

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> TraceSettings:
        values = (
            dict(OmegaConf.to_container(node, resolve=True))
            if isinstance(node, DictConfig)
            else dict(node)
        )
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown trace settings {unknown}; valid: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One record's rewrite prompt as traced: token ids, subject span, answer token."""

    case_id: str
    text: str
    ids: tuple[int, ...]
    #: First and last token (inclusive) that overlap the subject.
    subject_first: int
    subject_last: int
    #: First token of ``" " + target_true``: the token whose probability is traced.
    target: int
    target_text: str

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def encode_prompt(tok, request: EditRequest) -> Prompt:
    """Tokenise the filled-in rewrite prompt and locate the subject's tokens."""
    if request.target_true is None:
        raise ConfigError(f"record case_id={request.case_id} has no true object to trace")
    text, end = fill(request.prompt, request.subject)
    start = end - len(request.subject)
    enc = tok(text, return_offsets_mapping=True)
    inside = [
        j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start
    ]
    if not inside:
        raise ConfigError(f"record case_id={request.case_id}: subject {request.subject!r} "
                          f"has no token in {text!r}")
    return Prompt(
        case_id=request.case_id,
        text=text,
        ids=tuple(enc["input_ids"]),
        subject_first=inside[0],
        subject_last=inside[-1],
        target=target_ids(tok, request.target_true)[0],
        target_text=request.target_true,
    )


def position_classes(n_tokens: int, first: int, last: int) -> dict[str, tuple[int, ...]]:
    """ROME's position classes of a prompt of ``n_tokens`` whose subject spans first..last.

    ``middle_subject`` and ``further`` may be empty; ``first_after`` is empty when the
    subject ends the prompt. A token can be in two classes (see the module docstring).
    """
    if not 0 <= first <= last < n_tokens:
        raise ValueError(f"subject tokens {first}..{last} do not fit {n_tokens} tokens")
    end = n_tokens - 1
    return {
        "first_subject": (first,),
        "middle_subject": tuple(range(first + 1, last)),
        "last_subject": (last,),
        "first_after": (last + 1,) if last < end else (),
        "further": tuple(range(last + 2, end)),
        "last": (end,),
    }


def window_layers(layer: int, n_layers: int, window: int) -> range:
    """ROME's window around ``layer``: l − ⌊w/2⌋ .. l + ⌈w/2⌉ − 1, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def state_modules(spec: ModelSpec, kind: str, layer: int, window: int) -> tuple[str, ...]:
    """Modules whose outputs are restored for (kind, layer): the residual stream is one
    layer (ROME); MLP and attention outputs a window of layers."""
    layers = [layer] if kind == "residual" else window_layers(layer, spec.n_layers, window)
    return tuple(spec.module(KINDS[kind], i) for i in layers)


# ----------------------------------------------------------------------------- forward passes
def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache (``cache`` from transformers 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _final_hidden(lm: LoadedModel, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Hidden states after the final norm ``[rows, len, d]`` (the LM head is not run)."""
    ln_f = lm.spec.module("ln_f")
    return hooks.run_until(lm.model, [ln_f], input_ids=ids, **kwargs)[ln_f].output


def _prob(lm: LoadedModel, last_hidden: torch.Tensor, target: int) -> torch.Tensor:
    """P(target) from final hidden states ``[rows, d]`` -> ``[rows]`` (float32)."""
    logits = lm_head(lm.model, lm.spec, last_hidden).float()
    return torch.softmax(logits, -1)[:, target]


@torch.inference_mode()
def clean_run(
    lm: LoadedModel, prompt: Prompt, modules: Sequence[str]
) -> tuple[float, dict[str, torch.Tensor]]:
    """P(o) of the uncorrupted prompt and each named module's output ``[n_tokens, d]``."""
    ln_f = lm.spec.module("ln_f")
    ids = torch.tensor([prompt.ids], device=lm.device)
    names = [*modules, ln_f]
    with hooks.trace(lm.model, names) as tr:
        lm.model(input_ids=ids, use_cache=False)
    p = _prob(lm, tr[ln_f].output[:, -1], prompt.target)
    return float(p[0]), {m: tr[m].output[0] for m in modules}


def subject_noise(
    prompt: Prompt, samples: int, d_model: int, std: float, generator: torch.Generator
) -> torch.Tensor:
    """Noise for the subject tokens' embeddings ``[samples, n_subject, d]`` (seeded)."""
    n_subject = prompt.subject_last - prompt.subject_first + 1
    return torch.randn(samples, n_subject, d_model, generator=generator) * std


def _add_noise(prompt: Prompt, noise: torch.Tensor, start: int, stop: int, repeat: int):
    """``edit_outputs`` function: noise on the subject embeddings, for a run of the prompt's
    tokens ``start..stop-1`` whose rows are laid out as ``sample * repeat + r``; None when
    the run has no subject token."""
    first, last = max(prompt.subject_first, start), min(prompt.subject_last, stop - 1)
    if first > last:
        return None
    part = noise[:, first - prompt.subject_first : last + 1 - prompt.subject_first]  # [S, k, d]
    cols = slice(first - start, last + 1 - start)

    def fn(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, cols] += part.to(h.device, h.dtype).repeat_interleave(repeat, 0)
        return out

    return fn


def _restore(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
    """``edit_outputs`` function: put ``values`` back at ``hidden[rows, cols]``."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        return h.index_put((rows.to(h.device), cols.to(h.device)), values.to(h.device, h.dtype))

    return fn


def _start(restoration: Restoration, n_tokens: int, reuse_prefix: bool) -> int:
    """First token a restored run must compute (earlier ones come from the cache)."""
    if not reuse_prefix:
        return 0
    return min([n_tokens - 1, *(t for _, t in restoration)])


@torch.inference_mode()
def restored_probs(
    lm: LoadedModel,
    prompt: Prompt,
    noise: torch.Tensor,
    states: Mapping[str, torch.Tensor],
    restorations: Sequence[Restoration],
    batch_size: int = 1024,
    reuse_prefix: bool = True,
) -> torch.Tensor:
    """P*(o) of the corrupted prompt with each restoration applied, mean over the noise
    samples: ``[len(restorations)]``. An empty restoration gives the corrupted P*(o).

    ``noise`` ``[samples, n_subject, d]`` (from :func:`subject_noise`); ``states`` the clean
    outputs (from :func:`clean_run`) of every module a restoration names. Restorations that
    start at the same token share one prefix cache and run in batches of at most
    ``batch_size`` rows (at least one restoration per batch).
    """
    model, embed = lm.model, lm.spec.module("embed")
    samples, n = noise.shape[0], prompt.n_tokens
    out = torch.empty(len(restorations))
    ids = torch.tensor(prompt.ids, device=lm.device)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(restorations):
        bad = [(m, t) for m, t in r if not 0 <= t < n or m not in states]
        if bad:
            raise ValueError(
                f"restoration {sorted(bad)[:3]}: token out of range 0..{n - 1} "
                "or no clean state recorded for that module"
            )
        groups.setdefault(_start(r, n, reuse_prefix), []).append(i)
    per_batch = max(1, batch_size // samples)
    cache_arg = _cache_kwarg(model)
    for start, members in sorted(groups.items()):
        for sl in chunks(len(members), per_batch):
            idx = members[sl]
            reps = len(idx)
            kwargs: dict[str, Any] = {"use_cache": start > 0}
            if start > 0:  # the corrupted run's cache of tokens 0..start-1, per sample
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                prefix = ids[:start].expand(samples, start)
                prefix_noise = _add_noise(prompt, noise, 0, start, 1)
                with hooks.edit_outputs(model, {embed: prefix_noise} if prefix_noise else {}):
                    _final_hidden(lm, prefix, **{cache_arg: cache, "use_cache": True})
                cache.batch_repeat_interleave(reps)  # row = sample * reps + r
                kwargs[cache_arg] = cache
                kwargs["attention_mask"] = torch.ones(
                    samples * reps, n, dtype=torch.long, device=lm.device
                )
            edits = {}
            noise_fn = _add_noise(prompt, noise, start, n, reps)
            if noise_fn is not None:
                edits[embed] = noise_fn
            by_module: dict[str, list[tuple[int, int]]] = {}
            for r_pos, i in enumerate(idx):
                for m, t in restorations[i]:
                    by_module.setdefault(m, []).append((r_pos, t))
            for m, pairs in by_module.items():
                r_idx = torch.tensor([r for r, _ in pairs])
                t_idx = torch.tensor([t for _, t in pairs])
                rows = (torch.arange(samples)[:, None] * reps + r_idx[None]).reshape(-1)
                cols = (t_idx - start).repeat(samples)
                values = states[m][t_idx].repeat(samples, 1)  # [samples * k, d]
                edits[m] = _restore(rows, cols, values)
            run_ids = ids[start:].expand(samples * reps, n - start)
            with hooks.edit_outputs(model, edits):
                hidden = _final_hidden(lm, run_ids, **kwargs)
            p = _prob(lm, hidden[:, -1], prompt.target).view(samples, reps)
            out[idx] = p.mean(0).cpu()
    return out


# ----------------------------------------------------------------------------- one record
@dataclass(frozen=True)
class RecordTrace:
    """A record's traced probabilities."""

    prompt: Prompt
    p_clean: float
    p_corrupted: float
    kinds: tuple[str, ...]
    #: Restored P*(o) ``[kinds, layers, n_tokens]``; NaN for tokens before the subject.
    restored: np.ndarray = field(repr=False)


def trace_record(
    lm: LoadedModel,
    prompt: Prompt,
    settings: TraceSettings,
    noise_std: float,
    generator: torch.Generator,
) -> RecordTrace:
    """Every restoration of one record (``settings.kinds`` × layers × traced tokens)."""
    spec, n = lm.spec, prompt.n_tokens
    kinds = settings.kinds
    modules = sorted(
        {
            m
            for k in kinds
            for layer in range(spec.n_layers)
            for m in state_modules(spec, k, layer, settings.window)
        }
    )
    p_clean, states = clean_run(lm, prompt, modules)
    d_model = next(iter(states.values())).shape[-1]
    noise = subject_noise(prompt, settings.samples, d_model, noise_std, generator)
    tokens = range(prompt.subject_first, n)
    keys = [(k, layer, t) for k in kinds for layer in range(spec.n_layers) for t in tokens]
    restorations: list[Restoration] = [frozenset()] + [
        frozenset((m, t) for m in state_modules(spec, k, layer, settings.window))
        for k, layer, t in keys
    ]
    probs = restored_probs(
        lm, prompt, noise, states, restorations, settings.batch_size, settings.reuse_prefix
    )
    restored = np.full((len(kinds), spec.n_layers, n), np.nan)
    for (k, layer, t), p in zip(keys, probs[1:].tolist(), strict=True):
        restored[kinds.index(k), layer, t] = p
    return RecordTrace(prompt, p_clean, float(probs[0]), kinds, restored)


# ----------------------------------------------------------------------------- selection
@torch.inference_mode()
def next_token_probs(
    lm: LoadedModel, prompts: Sequence[Prompt], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: P(o) and whether o is the top-1 next token (right padding, batched)."""
    p_out, top_out = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=bool)
    for sl in chunks(len(prompts), batch_size):
        part = prompts[sl]
        ids, mask = pad([p.ids for p in part], lm.tokenizer.pad_token_id, lm.device)
        hidden = _final_hidden(lm, ids, attention_mask=mask, use_cache=False)
        last = hidden[torch.arange(len(part)), mask.sum(1) - 1]
        probs = torch.softmax(lm_head(lm.model, lm.spec, last).float(), -1)
        target = torch.tensor([p.target for p in part], device=probs.device)
        p_out[sl] = probs[torch.arange(len(part)), target].cpu().numpy()
        top_out[sl] = (probs.argmax(-1) == target).cpu().numpy()
    return p_out, top_out


def select_records(
    lm: LoadedModel, requests: Sequence[EditRequest], n: int, select: str, batch_size: int = 64
) -> list[tuple[int, Prompt]]:
    """The first ``n`` records (dataset order) to trace, with their dataset index.

    ``known``: only those whose true object's first token is the top-1 prediction (ROME).
    """
    if select not in SELECT:
        raise ConfigError(f"trace.select={select!r} is not one of {list(SELECT)}")
    usable = [(i, r) for i, r in enumerate(requests) if r.target_true is not None]
    if not usable:
        raise ConfigError("the dataset has no records with a true object (target_true) to trace")
    chosen: list[tuple[int, Prompt]] = []
    for sl in chunks(len(usable), max(batch_size, 4 * n if select == "known" else n)):
        part = [(i, encode_prompt(lm.tokenizer, r)) for i, r in usable[sl]]
        if select == "known":
            _, top = next_token_probs(lm, [p for _, p in part], batch_size)
            part = [x for x, ok in zip(part, top, strict=True) if ok]
        chosen.extend(part)
        if len(chosen) >= n:
            return chosen[:n]
    if not chosen:
        raise ConfigError(
            f"trace.select=known: the model predicts the true object of none of "
            f"the {len(usable)} records; use trace.select=all to trace them anyway"
        )
    log.warning(
        "only %d of the %d records are known to the model (trace.n_records=%d)",
        len(chosen),
        len(usable),
        n,
    )
    return chosen


def embedding_std(lm: LoadedModel, prompts: Sequence[Prompt]) -> float:
    """σ: standard deviation of all entries of the subject tokens' embeddings (ROME)."""
    embed = hooks.get_module(lm.model, lm.spec.module("embed"))
    ids = [t for p in prompts for t in p.ids[p.subject_first : p.subject_last + 1]]
    with torch.inference_mode():
        return float(embed(torch.tensor(ids, device=lm.device)).float().std())


def record_generator(seed: int, index: int) -> torch.Generator:
    """The noise generator of the record at dataset ``index``: a pure function of both."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
