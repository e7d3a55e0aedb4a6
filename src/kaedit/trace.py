"""Causal tracing (ROME, Meng et al. 2022a §2.1): which hidden states carry a recalled fact.

``python -m kaedit.trace model=NAME dataset=counterfact trace.n_records=N``

For each of N records (by default those the model gets right: the first token of the true
object is its top-1 next token after the filled-in rewrite prompt, as ROME's "known facts"):

1. **clean run** -- P(o), the probability of that token, and every state that can be
   restored: the residual stream (decoder block output h^l), the MLP output m^l and the
   attention output a^l, at every token;
2. **corrupted run** -- Gaussian noise N(0, ν²) added to the embeddings of the subject
   tokens, ν = ``noise`` × the standard deviation of the subject tokens' embeddings
   (ROME: 3σ); ``samples`` seeded noise draws per record; P*(o) is their mean;
3. **restored runs** -- the corrupted run with clean states put back at one token: one
   layer's residual stream, or the MLP / attention outputs of a window of ``window`` layers
   around the layer (ROME's window: layers l − ⌊w/2⌋ .. l + ⌈w/2⌉ − 1, clipped to the
   model). The indirect effect is IE = P*_restored(o) − P*(o).

The average indirect effect (AIE) averages IE over records and over the tokens of each
position class -- first / middle / last subject token, first subsequent token, further
tokens, last token (ROME's classes; a token can be in two, e.g. a one-token subject is both
its first and last token) -- per layer and state kind. Tokens before the subject are not
traced: the noise never reaches them, so restoring them changes nothing.

Batching: restoring a state at token t leaves tokens 0..t−1 as in the corrupted run, so all
restorations at token t share the corrupted run's key/value cache of those tokens and run
only tokens t..n−1; the rows of all restorations at t (kinds × layers × samples) go through
one forward pass when they fit in ``batch_size`` rows.

Outputs, in ``<run_dir>/trace/``: ``aie.csv`` (kind, layer, position, AIE, its standard
error, count of record-tokens, records), ``records.csv`` (per record: prompt, subject
tokens, P(o) clean and corrupted), ``restored.csv`` (per record, kind, layer and token: the
restored P(o)), ``heatmap_{residual,mlp,attn}.png`` (ROME's layers × positions maps),
``aie_by_layer.png`` (AIE at the last subject token), ``recommendation.json`` and the
trackers' files (``metrics.csv``: one row per layer; W&B offline run).

The recommendation is the layer L of maximum MLP AIE at the last subject token and the
edit window L−n+1..L ending there (the paper's L−4..L for n = 5; n defaults to the length
of the model's ``edit.layers``). A run uses it with ``method.layers=from_trace:RUN_DIR``
(:func:`resolve_from_trace`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
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
#: ``method.layers=from_trace:RUN_DIR`` (or ``model.edit.layers=...``).
FROM_TRACE = "from_trace:"
TRACE_DIR = "trace"
RECOMMENDATION = "recommendation.json"
#: The state whose AIE picks the edit layer (ROME §2.2 / MEMIT §4.1): the MLP output at
#: the last subject token.
RECOMMEND_KIND, RECOMMEND_POSITION = "mlp", "last_subject"

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
        raise ValueError(f"subject {request.subject!r} has no token in {text!r}")
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
    with hooks.trace(lm.model, [ln_f], stop=True) as tr, contextlib.suppress(hooks.StopForward):
        lm.model(input_ids=ids, **kwargs)
    return tr[ln_f].output


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
    for (k, layer, t), p in zip(keys, probs[1:].tolist()):
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
            part = [x for x, ok in zip(part, top) if ok]
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


# ----------------------------------------------------------------------------- tables
def restored_table(traces: Sequence[RecordTrace]):
    """Long table: one row per (record, kind, layer, traced token), with its position
    classes (``;``-joined), restored P*(o) and IE."""
    import pandas as pd

    rows = []
    for tr in traces:
        pr = tr.prompt
        classes = position_classes(pr.n_tokens, pr.subject_first, pr.subject_last)
        of_token = {
            t: ";".join(c for c, ts in classes.items() if t in ts)
            for t in range(pr.subject_first, pr.n_tokens)
        }
        for ki, kind in enumerate(tr.kinds):
            for layer in range(tr.restored.shape[1]):
                for t, cls in of_token.items():
                    p = float(tr.restored[ki, layer, t])
                    rows.append(
                        {
                            "case_id": pr.case_id,
                            "kind": kind,
                            "layer": layer,
                            "token": t,
                            "positions": cls,
                            "p_restored": p,
                            "ie": p - tr.p_corrupted,
                        }
                    )
    return pd.DataFrame(rows)


def records_table(traces: Sequence[RecordTrace]):
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "case_id": t.prompt.case_id,
                "prompt": t.prompt.text,
                "target": t.prompt.target_text,
                "n_tokens": t.prompt.n_tokens,
                "subject_first": t.prompt.subject_first,
                "subject_last": t.prompt.subject_last,
                "p_clean": t.p_clean,
                "p_corrupted": t.p_corrupted,
            }
            for t in traces
        ]
    )


def aie_table(restored):
    """AIE per (kind, layer, position class): mean IE over record-tokens, its standard error,
    the number of record-tokens (``count``) and of records (``records``)."""
    import pandas as pd

    long = restored.assign(position=restored["positions"].str.split(";")).explode("position")
    long = long[long["position"] != ""]
    g = long.groupby(["kind", "layer", "position"], sort=False)
    out = g.agg(
        aie=("ie", "mean"), sd=("ie", "std"), count=("ie", "size"), records=("case_id", "nunique")
    ).reset_index()
    out["sem"] = (out.pop("sd") / np.sqrt(out["count"])).fillna(0.0)
    order = {k: i for i, k in enumerate(POSITIONS)}
    kinds = {k: i for i, k in enumerate(KINDS)}
    out = out.sort_values(
        ["kind", "position", "layer"],
        key=lambda s: (
            s.map(kinds) if s.name == "kind" else s.map(order) if s.name == "position" else s
        ),
    )
    return pd.DataFrame(
        out[["kind", "layer", "position", "aie", "sem", "count", "records"]]
    ).reset_index(drop=True)


def aie_grid(aie, kind: str, n_layers: int) -> np.ndarray:
    """``[positions, layers]`` AIE of one kind (NaN where a class had no tokens)."""
    grid = np.full((len(POSITIONS), n_layers), np.nan)
    rows = aie[aie["kind"] == kind]
    pos = list(POSITIONS)
    for r in rows.itertuples():
        grid[pos.index(r.position), int(r.layer)] = r.aie
    return grid


# ----------------------------------------------------------------------------- recommendation
@dataclass(frozen=True)
class Recommendation:
    """The edit layer (max MLP AIE at the last subject token) and the window ending there."""

    model: str
    n_layers: int
    layer: int
    layers: list[int]
    aie: float
    kind: str = RECOMMEND_KIND
    position: str = RECOMMEND_POSITION

    def snippet(self) -> str:
        """The YAML a model config takes (``conf/model/<name>.yaml``)."""
        return (
            f"# conf/model/{self.model}.yaml (or method.layers=from_trace:RUN_DIR)\n"
            f"edit:\n  layers: [{', '.join(str(x) for x in self.layers)}]\n"
        )


def edit_window(layer: int, n_edit_layers: int) -> list[int]:
    """``layer − n + 1 .. layer``, clipped at layer 0 (then shorter than n)."""
    return list(range(max(0, layer - n_edit_layers + 1), layer + 1))


def recommend(aie, model: str, n_layers: int, n_edit_layers: int) -> Recommendation:
    """The layer of maximum MLP AIE at the last subject token (the lowest layer on ties)."""
    rows = aie[(aie["kind"] == RECOMMEND_KIND) & (aie["position"] == RECOMMEND_POSITION)]
    if rows.empty:
        raise ConfigError(
            f"no {RECOMMEND_KIND!r} AIE at the {RECOMMEND_POSITION!r} token to "
            f"recommend layers from (trace.kinds must include {RECOMMEND_KIND!r})"
        )
    rows = rows.sort_values("layer")
    best = rows.loc[rows["aie"].idxmax()]
    layer = int(best["layer"])
    return Recommendation(
        model=model,
        n_layers=n_layers,
        layer=layer,
        layers=edit_window(layer, n_edit_layers),
        aie=float(best["aie"]),
    )


def read_recommendation(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/trace/recommendation.json`` (a relative RUN_DIR: from the working directory,
    else from the repository root)."""
    from kaedit.experiment import REPO_ROOT

    given = Path(str(run_dir)).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for base in candidates:
        path = base / TRACE_DIR / RECOMMENDATION
        if path.is_file():
            return json.loads(path.read_text())
    raise ConfigError(
        f"{FROM_TRACE}{run_dir}: {str(candidates[0] / TRACE_DIR / RECOMMENDATION)!r} "
        "does not exist; run `python -m kaedit.trace hydra.run.dir=RUN_DIR` first"
    )


def resolve_from_trace(cfg: DictConfig) -> DictConfig:
    """Replace ``from_trace:RUN_DIR`` in ``model.edit.layers`` or ``method.layers`` by the
    traced window: ``n`` layers ending at the recommended layer, ``n`` the length of the
    model's ``edit.layers`` (or of the recommended window when that is itself ``from_trace``).
    Returns ``cfg`` unchanged when neither is a ``from_trace:`` value, else a resolved copy.
    """
    keys = [
        k
        for k in ("model.edit.layers", "method.layers")
        if isinstance(v := OmegaConf.select(cfg, k, default=None), str) and v.startswith(FROM_TRACE)
    ]
    if not keys:
        return cfg
    cfg = cfg.copy()
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str):  # method.layers: ${model.edit.layers}, resolved above
            continue
        rec = read_recommendation(value[len(FROM_TRACE) :])
        if rec.get("model") != cfg.model.name:
            raise ConfigError(
                f"{key}={value!r}: that trace is of model {rec.get('model')!r}, "
                f"this run uses model={cfg.model.name!r}"
            )
        own = OmegaConf.select(cfg, "model.edit.layers", default=None)
        n = len(own) if not isinstance(own, str) and own is not None else len(rec["layers"])
        layers = edit_window(int(rec["layer"]), n)
        OmegaConf.update(cfg, key, layers, merge=False)
        log.info(
            "%s=%s -> %s (max %s AIE at layer %d)", key, value, layers, rec["kind"], rec["layer"]
        )
    return cfg


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


COLORS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {
    "residual": "the residual stream (one layer)",
    "mlp": "MLP outputs",
    "attn": "attention outputs",
}


def plot_heatmap(
    aie, kind: str, n_layers: int, n_records: int, window: int, path: Path, dpi: int = 90
) -> Path:
    """ROME's averaged heat-map: position classes × layers, colour = AIE."""
    plt = _pyplot()
    grid = aie_grid(aie, kind, n_layers)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.16 * n_layers + 2.0), 2.4))
    im = ax.pcolormesh(
        np.ma.masked_invalid(grid),
        cmap=COLORS[kind],
        vmin=min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0.0,
    )
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(POSITIONS)) + 0.5, list(POSITIONS.values()), fontsize=8)
    step = max(1, n_layers // 10)
    ax.set_xticks(
        np.arange(0, n_layers, step) + 0.5, [str(i) for i in range(0, n_layers, step)], fontsize=8
    )
    label = TITLES[kind] if kind == "residual" else f"{TITLES[kind]} (window {window})"
    ax.set_title(f"AIE of restoring {label}, {n_records} prompts", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    cb = fig.colorbar(im, ax=ax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("AIE", fontsize=8)
    return _save(fig, path, dpi)


def plot_aie_by_layer(
    aie,
    rec: Recommendation | None,
    n_layers: int,
    n_records: int,
    window: int,
    path: Path,
    dpi: int = 90,
) -> Path:
    """AIE at the last subject token against the layer, one line per kind; the recommended
    window shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    colors = {"residual": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for kind in KINDS:
        rows = aie[(aie["kind"] == kind) & (aie["position"] == "last_subject")].sort_values("layer")
        if rows.empty:
            continue
        ax.plot(rows["layer"], rows["aie"], marker="o", ms=3, color=colors[kind], label=kind)
        ax.fill_between(
            rows["layer"],
            rows["aie"] - rows["sem"],
            rows["aie"] + rows["sem"],
            color=colors[kind],
            alpha=0.15,
        )
    if rec is not None:
        ax.axvspan(
            rec.layers[0] - 0.4,
            rec.layers[-1] + 0.4,
            color="tab:green",
            alpha=0.1,
            label=f"edit layers {rec.layers[0]}-{rec.layers[-1]}",
        )
        ax.axvline(rec.layer, color="tab:green", ls="--", lw=0.8)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("AIE at last subject token")
    ax.set_title(
        f"Average indirect effect, {n_records} prompts (MLP / attn window {window})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, dpi)


def write_figures(
    aie, rec: Recommendation | None, n_layers: int, n_records: int, window: int, out: Path
) -> dict[str, Path]:
    """``heatmap_<kind>.png`` for each kind in ``aie`` and ``aie_by_layer.png`` in ``out``."""
    kinds = [k for k in KINDS if (aie["kind"] == k).any()]
    figures = {
        f"heatmap_{k}": plot_heatmap(aie, k, n_layers, n_records, window, out / f"heatmap_{k}.png")
        for k in kinds
    }
    figures["aie_by_layer"] = plot_aie_by_layer(
        aie, rec, n_layers, n_records, window, out / "aie_by_layer.png"
    )
    return figures


# ----------------------------------------------------------------------------- the run
def record_generator(seed: int, index: int) -> torch.Generator:
    """The noise generator of the record at dataset ``index``: a pure function of both."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


@dataclass(frozen=True)
class TraceResult:
    out_dir: Path
    summary: dict[str, Any]
    recommendation: Recommendation | None


def run(cfg: DictConfig, run_dir: str | None = None) -> TraceResult:
    """Trace ``trace.n_records`` records of ``dataset`` on ``model``; write ``<run_dir>/trace``."""
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from kaedit import data
    from kaedit.experiment import build, resolve_data_root
    from kaedit.models import load_model
    from kaedit.tracking import Trackers, atomic_write

    cfg = cfg.copy()
    resolve_data_root(cfg)
    settings = TraceSettings.from_config(cfg.trace)
    edit_layers = OmegaConf.select(cfg, "model.edit.layers", default=None)
    if settings.n_edit_layers is None and (edit_layers is None or isinstance(edit_layers, str)):
        raise ConfigError(
            f"model.edit.layers={edit_layers!r} is not a list of layers: set "
            "trace.n_edit_layers to the number of edit layers to recommend"
        )
    n_edit = settings.n_edit_layers or len(edit_layers)
    records = data.from_config(cfg.dataset, cache_dir=str(Path(cfg.cache_dir) / "data"))
    lm = load_model(cfg.model, lambda: build(cfg.model.load))
    lm.spec.check(lm.model, list(range(lm.spec.n_layers)))
    out = Path(run_dir or cfg.get("run_dir") or "outputs/trace/manual") / TRACE_DIR
    t0 = time.perf_counter()

    chosen = select_records(lm, records, settings.n_records, settings.select)
    sigma = embedding_std(lm, [p for _, p in chosen])
    noise_std = settings.noise * sigma
    log.info(
        "tracing %d records (%s), noise std %.4g = %g x %.4g",
        len(chosen),
        settings.select,
        noise_std,
        settings.noise,
        sigma,
    )
    t_select = time.perf_counter() - t0

    resolved = OmegaConf.to_container(cfg, resolve=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out.parent / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    named = {
        name: instantiate(t, _partial_=True)(run_dir=str(out), run_config=resolved, resume=None)
        for name, t in (cfg.logger or {}).items()
    }
    trackers = Trackers(named.values())
    try:
        traces = []
        t1 = time.perf_counter()
        for k, (index, prompt) in enumerate(
            tqdm(chosen, desc="tracing", unit="record", disable=None), start=1
        ):
            t_rec = time.perf_counter()
            tr = trace_record(
                lm, prompt, settings, noise_std, record_generator(int(cfg.seed), index)
            )
            traces.append(tr)
            log.info(
                "record %d/%d (case_id %s, %d tokens): P(o) clean %.3f, corrupted %.3f (%.0f s)",
                k,
                len(chosen),
                prompt.case_id,
                prompt.n_tokens,
                tr.p_clean,
                tr.p_corrupted,
                time.perf_counter() - t_rec,
            )
        t_trace = time.perf_counter() - t1

        restored = restored_table(traces)
        records_df = records_table(traces)
        aie = aie_table(restored)
        atomic_write(out / "aie.csv", aie.to_csv(index=False, float_format="%.6g"))
        atomic_write(out / "records.csv", records_df.to_csv(index=False, float_format="%.6g"))
        atomic_write(out / "restored.csv", restored.to_csv(index=False, float_format="%.6g"))
        rec = None
        if RECOMMEND_KIND in settings.kinds:
            rec = recommend(aie, str(cfg.model.name), lm.spec.n_layers, n_edit)
        else:
            log.warning("trace.kinds has no %r: no layer recommendation", RECOMMEND_KIND)
        figures = write_figures(aie, rec, lm.spec.n_layers, len(traces), settings.window, out)
        summary: dict[str, Any] = {
            "model": str(cfg.model.name),
            "n_layers": lm.spec.n_layers,
            "n_records": len(traces),
            "select": settings.select,
            "samples": settings.samples,
            "window": settings.window,
            "noise": settings.noise,
            "embedding_std": sigma,
            "noise_std": noise_std,
            "p_clean_mean": float(records_df["p_clean"].mean()),
            "p_corrupted_mean": float(records_df["p_corrupted"].mean()),
            "select_s": t_select,
            "trace_s": t_trace,
            "trace_s_per_record": t_trace / max(1, len(traces)),
        }
        if rec is not None:
            summary.update(
                {
                    "recommended_layer": rec.layer,
                    "recommended_layers": rec.layers,
                    "recommended_aie": rec.aie,
                }
            )
            atomic_write(
                out / RECOMMENDATION,
                json.dumps(
                    {
                        **asdict(rec),
                        "n_edit_layers": n_edit,
                        "window": settings.window,
                        "n_records": len(traces),
                        "samples": settings.samples,
                        "select": settings.select,
                        "noise_std": noise_std,
                    },
                    indent=2,
                )
                + "\n",
            )
        for layer in range(lm.spec.n_layers):
            at = aie[aie["layer"] == layer]
            trackers.log(
                {
                    "layer": layer,
                    **{f"aie/{r.kind}/{r.position}": float(r.aie) for r in at.itertuples()},
                },
                layer,
            )
        trackers.images({k: str(v) for k, v in figures.items()})
        trackers.summary(summary)
        return TraceResult(out, summary, rec)
    finally:
        trackers.finish()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="trace")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kaedit.errors import user_errors_exit

    with user_errors_exit(log):
        result = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    s = result.summary
    print(
        f"traced {s['n_records']} records of {s['model']} in {s['trace_s']:.0f} s "
        f"(P(o) clean {s['p_clean_mean']:.3f}, corrupted {s['p_corrupted_mean']:.3f}); "
        f"results in {result.out_dir}"
    )
    if result.recommendation is not None:
        rec = result.recommendation
        print(
            f"max {rec.kind} AIE at the last subject token: layer {rec.layer} "
            f"(AIE {rec.aie:.4f}); edit layers:"
        )
        print(rec.snippet(), end="")


if __name__ == "__main__":
    main()
