"""Maths shared by the locate-then-edit methods (MEMIT, PMET, AdaPLE, AlphaEdit, ROME).

* :func:`context_templates` -- generated prefixes, made once per run (MEMIT §3), grouped
  as :class:`Templates`.
* :func:`compute_keys` -- k^l: input of the edited projection at the last subject token,
  averaged over prefixed prompts within each template group, then across groups (MEMIT
  eq. 17 as ``memit/compute_ks.py`` computes it; AdaPLE eq. 26).
* :func:`optimize_targets` -- target values for all requests of a batch at once: additive
  deltas at the last subject token of chosen modules, optimised jointly (padded forwards
  grouped by row length, one backward per step) with independent per-request losses and
  early stopping (MEMIT eq. 16 / PMET / AdaPLE eq. 25); positions before the subject
  token are computed once and cached (``TargetConfig.fast``), and requests are taken in
  chunks under a memory budget (``TargetConfig.chunk_tokens``).
* :func:`solve_update` -- the closed form Δ = R Kᵀ (λC + c·K Kᵀ)⁻¹ (paper eq. 2 and 4),
  optionally with ENCORE's μI and earlier edits' K_p K_pᵀ in the inverse.
* :func:`nas_scale` / :func:`apply_nas` -- Norm-Anchor Scaling of the value vectors
  (``TargetConfig.nas_anchor``, arXiv 2602.02543), applied by :func:`optimize_targets`;
  :func:`nas_anchor` computes the anchor on the unedited model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kaedit.hooks import edit_outputs, run_until, start_at
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.sampling import SeededTopK
from kaedit.timing import Stopwatch
from kaedit.tokens import (
    Encoded,
    TeacherForced,
    block_inputs,
    chunks,
    encode,
    final_hidden,
    lm_head,
    pad,
    target_ids,
)
from kaedit.weights import applied


@dataclass(frozen=True)
class Templates(Sequence[str]):
    """Context templates in groups, as MEMIT's ``get_context_templates`` makes them
    (kmeng01/memit ``memit/memit_main.py``): ``(("{}",), (<generated>. {}, ...), ...)``,
    one group for the plain prompt and one per ``(length, count)`` spec.

    It iterates, indexes and measures as the flat list ``["{}", <generated>. {}, ...]``
    (what target optimisation uses, as ``compute_z`` flattens the groups); the grouping
    only changes how :func:`compute_keys` averages (:meth:`weights`).
    """

    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.groups or not all(self.groups):
            raise ValueError(f"Templates: every group needs a template, got {self.groups!r}")

    @classmethod
    def ungrouped(cls, templates: Sequence[str]) -> Templates:
        """Every template its own group: :meth:`weights` is then the flat mean (ROME's
        ``compute_u``). A plain list of templates means this."""
        return cls(tuple((t,) for t in templates))

    @property
    def flat(self) -> list[str]:
        return [t for group in self.groups for t in group]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __getitem__(self, i):  # type: ignore[override]
        return self.flat[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.flat)

    def weights(self) -> torch.Tensor:
        """Weight of each flat template in the two-level mean ``[T]`` (float32, sums to 1):
        1 / (number of groups · size of its group)."""
        return torch.tensor([1.0 / (len(self.groups) * len(g)) for g in self.groups for _ in g])


def as_templates(templates: Sequence[str]) -> Templates:
    """``templates`` itself if grouped, else every template its own group."""
    return templates if isinstance(templates, Templates) else Templates.ungrouped(templates)


def context_templates(
    lm: LoadedModel,
    specs: Sequence[Sequence[int]] = ((10, 5),),
    starts: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    seed: int = 0,
) -> Templates:
    """``(("{}",), ("<generated text>. {}", ...), ...)``: prefixes that make edits generalise.

    For each ``(length, count)`` in ``specs``, ``count`` continuations of ``length`` tokens
    are sampled (top-k 5) from the start words, with a CPU generator seeded anew for each
    spec: the same templates on every device, and the global RNG untouched. Each spec is
    one group (kmeng01/memit ``memit/memit_main.py``: ``get_context_templates``).
    """
    from transformers import LogitsProcessorList

    model, tok = lm.model, lm.tokenizer
    groups: list[tuple[str, ...]] = [("{}",)]
    for length, count in specs:
        sampler = SeededTopK(5, seed)  # each spec starts from the seed
        per_start = max(1, count // len(starts))
        enc = [list(tok(s)["input_ids"]) for s in starts for _ in range(per_start)]
        # left-padded so every row continues from its last real token
        ids, mask = pad(enc, tok.pad_token_id, lm.device, left=True)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
            logits_processor=LogitsProcessorList([sampler]), pad_token_id=tok.pad_token_id,
        )
        group = []
        for row, m in zip(gen, mask, strict=True):
            text = tok.decode(row[int(width - m.sum()) :], skip_special_tokens=True)
            group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(tuple(group))
    return Templates(tuple(groups))


def prompt_template(context: str, request: EditRequest) -> str:
    """A context template applied to the request's prompt: still one ``{}`` (the subject)."""
    return context.replace("{}", request.prompt.replace("{}", "\x00"), 1).replace("\x00", "{}")


def key_encodings(lm: LoadedModel, requests: Sequence[EditRequest],
                  templates: Sequence[str]) -> list[Encoded]:
    """The prompts :func:`compute_keys` reads: each request under each template, in
    request-major order (``[n·T]``)."""
    tpl = as_templates(templates)
    return [encode(lm.tokenizer, prompt_template(t, r), r.subject) for r in requests
            for t in tpl]


def plain_encodings(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[Encoded]:
    """The plain prompts :func:`hidden_at_subject` reads, one per request."""
    return [encode(lm.tokenizer, r.prompt, r.subject) for r in requests]


@dataclass(frozen=True)
class BlockStart:
    """Prompt encodings with the clean input of decoder block ``start`` cached, per padded
    chunk (issue 30). A key or hidden state at a module in block ``start`` or above is
    then computed from there, without re-running the blocks below: valid while no weight
    below block ``start`` changes (:func:`spread_residual` edits blocks ``start`` and up
    only). ``start`` = 0: nothing cached, every pass starts at the embeddings."""

    start: int
    #: Per chunk: the forward's inputs (``input_ids`` or the block's input as
    #: ``inputs_embeds``, and ``attention_mask``) and each row's last subject token.
    parts: tuple[tuple[dict[str, torch.Tensor], torch.Tensor], ...]

    @classmethod
    @torch.no_grad()
    def build(cls, lm: LoadedModel, encs: Sequence[Encoded], start: int = 0,
              batch_size: int = 64) -> BlockStart:
        parts = []
        for sl in chunks(len(encs), batch_size):
            batch = encs[sl]
            ids, mask = pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
            inputs = ({"inputs_embeds": block_inputs(lm.model, lm.spec, start, ids, mask)}
                      if start else {"input_ids": ids})
            idx = torch.tensor([e.subject_last for e in batch], device=lm.device)
            parts.append(({**inputs, "attention_mask": mask}, idx))
        return cls(int(start), tuple(parts))

    @torch.no_grad()
    def at(self, lm: LoadedModel, module: str, want_input: bool) -> torch.Tensor:
        """Input (``want_input``) or output of ``module`` at each row's last subject token
        ``[rows, d]`` (float32), on the model as it is now above block ``start``."""
        block = lm.spec.layer_of(module)
        if self.start and (block is None or block < self.start):
            raise ValueError(f"BlockStart: {module!r} is below the cached block {self.start}")
        zeroed = [lm.spec.pos_embed] if lm.spec.pos_embed else []
        rows = []
        for inputs, idx in self.parts:
            def forward(inputs: dict[str, torch.Tensor] = inputs) -> None:
                if not self.start:
                    lm.model(**inputs, use_cache=False)
                    return
                with start_at(lm.model, lm.spec.layers_path, self.start, zeroed):
                    lm.model(**inputs, use_cache=False)

            # hooks resolve the module's path before start_at renumbers the blocks
            tr = run_until(lm.model, [module], inputs=want_input, outputs=not want_input,
                           forward=forward)
            h = tr[module].input if want_input else tr[module].output
            rows.append(h[torch.arange(len(idx), device=h.device), idx].float())
        return torch.cat(rows)


@torch.no_grad()
def compute_keys(
    lm: LoadedModel,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    module_kind: str = "mlp_out",
    batch_size: int = 64,
    prepared: BlockStart | None = None,
) -> torch.Tensor:
    """K ``[d_in, n_requests]``: the key at the last subject token, averaged over the
    templates of each group, then over the groups (kmeng01/memit ``memit/compute_ks.py``,
    also xpq-tech/PMET ``edit/pmet/compute_ks.py`` and jianghoucheng/AlphaEdit
    ``AlphaEdit/compute_ks.py``): with the default single spec the plain
    prompt weighs ½ and the generated prefixes share the other ½. A plain list of
    templates is every template its own group, i.e. the flat mean. ``prepared``: the
    :func:`key_encodings` of these requests and templates with a block's input cached
    (:class:`BlockStart`), else they are encoded and run from the embeddings."""
    tpl = as_templates(templates)
    module = lm.spec.module(module_kind, layer)
    prepared = prepared or BlockStart.build(lm, key_encodings(lm, requests, tpl),
                                            batch_size=batch_size)
    keys = prepared.at(lm, module, want_input=True)  # [n*T, d_in]
    w = tpl.weights().to(keys.device)  # [T] two-level mean as one weighted sum
    return (keys.view(len(requests), len(tpl), -1) * w[None, :, None]).sum(1).T


@torch.no_grad()
def hidden_at_subject(
    lm: LoadedModel, module: str, requests: Sequence[EditRequest], batch_size: int = 64,
    prepared: BlockStart | None = None,
) -> torch.Tensor:
    """Output of ``module`` at the last subject token of each plain prompt ``[n, d]``
    (``prepared``: their :func:`plain_encodings` with a block's input cached)."""
    prepared = prepared or BlockStart.build(lm, plain_encodings(lm, requests),
                                            batch_size=batch_size)
    return prepared.at(lm, module, want_input=False)


#: Where the KL term reads the next-token distribution of ``kl_prompt``.
KL_POSITIONS = ("subject_last", "last")
#: Which loss the early stop compares with ``early_stop_loss``.
EARLY_STOP_ON = ("total", "nll", "most_probable")


@dataclass(frozen=True)
class TargetConfig:
    """Hyper-parameters of target-value optimisation (MEMIT's v*, PMET's δᵃ/δᵐ)."""

    lr: float = 0.5
    steps: int = 25
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    #: Stop optimising a request once its loss (``early_stop_on``) is below this.
    early_stop_loss: float = 0.05
    #: ``total``: the total loss (NLL + KL + weight decay, the loss it is optimised on), as
    #: kmeng01/memit ``memit/compute_z.py`` and kmeng01/rome ``rome/compute_v.py`` compare
    #: it (``loss < 5e-2``; they optimise one request at a time, so their per-call test is
    #: this per-request test). ``nll``: the NLL of the new object alone. The weight-decay
    #: term ‖δ‖/‖h‖² grows as hidden states get smaller, so on a small model the total may
    #: never reach the threshold and every request runs all ``steps`` (SmolLM2 keeps
    #: ``nll``, the rule its settings were measured with: conf/model/smollm2.yaml).
    #: ``most_probable``: most-probable early stopping (MPES, ENCORE: Gupta et al. 2025,
    #: scalable-model-editing/knowledge-editing-regularization ``encore/compute_z.py``,
    #: ``prob_cutoff: -2``): a request also stops once, at ``most_probable_steps`` of its
    #: steps, the new object was the most probable continuation at every target token of
    #: every one of its prompts, beside the ``total`` rule, as that code keeps both.
    early_stop_on: str = "total"
    #: MPES: steps at which every target token must be the argmax before a request stops.
    #: Counted as the reference counts them (its ``correct_counter`` is never reset, so the
    #: steps need not be consecutive; once a target is the argmax it nearly always stays).
    most_probable_steps: int = 2
    kl_prompt: str = "{} is a"
    #: ``subject_last``: the KL term compares the distributions at the last subject token
    #: of ``kl_prompt`` (kmeng01/memit ``memit/compute_z.py``, kmeng01/rome
    #: ``rome/compute_v.py``: ``kl_logits`` are read at ``lookup_idxs``, the fact token).
    #: ``last``: at the prompt's last token, the next-token distribution after "{S} is a",
    #: which is how the papers' P[y | p'] reads (ROME §3; AdaPLE eq. 25 names only the
    #: prompt '{S} is a', no position).
    kl_position: str = "subject_last"
    #: True: positions before each row's last subject token are run once (no grad) and
    #: their keys/values cached; each step runs only the positions from the subject token
    #: on (see :func:`optimize_targets`). False: every step recomputes every row in full.
    #: Both give the same targets up to float rounding.
    fast: bool = True
    #: True: the blocks below the lowest edited module's block are run once per chunk (no
    #: grad), and each step starts from that block's cached input (issue 30): no delta can
    #: change what those blocks compute. False: every step runs every block. Both give the
    #: same targets up to float rounding.
    from_edit_layer: bool = True
    #: Memory budget of one joint optimisation, in token positions (rows × padded width of
    #: the rows each step runs): requests are optimised in consecutive chunks that stay
    #: under it (a request never splits), so activation memory is bounded whatever the
    #: batch. Requests are independent, so the chunking does not change the result.
    chunk_tokens: int = 8192
    #: Rows of a chunk are run in up to this many padded forward passes per step, grouped
    #: by length so that short rows (e.g. the KL rows, one column on the fast path) are
    #: not padded to the longest; 1 = one padded batch.
    length_groups: int = 4
    #: NAS (Norm-Anchor Scaling, arXiv 2602.02543; SasyaTitech/NAS): the anchor, the mean
    #: ‖v*‖ of the unedited model (:func:`nas_anchor`, ``python -m kaedit.nas_anchor``);
    #: None: NAS off. With it, each solved value vector v* (the MLP output target, see
    #: :func:`apply_nas`) is rescaled to this norm, or dropped (v* = v0, no edit) when its
    #: norm exceeds ``nas_skip_factor`` times it (:func:`nas_scale`).
    nas_anchor: float | None = None
    #: NAS: a v* with ‖v*‖ > this · ``nas_anchor`` is not edited (v* = v0). 2 in the
    #: reference's MEMIT, AlphaEdit, ENCORE, LyapLock and NAS ``compute_z.py``; 5 in its
    #: ROME ``compute_v.py`` (conf/method/rome.yaml).
    nas_skip_factor: float = 2.0

    def __post_init__(self) -> None:
        from kaedit.errors import ConfigError

        if self.kl_position not in KL_POSITIONS:
            raise ConfigError(
                f"target.kl_position={self.kl_position!r} is not one of {list(KL_POSITIONS)}"
            )
        if self.early_stop_on not in EARLY_STOP_ON:
            raise ConfigError(
                f"target.early_stop_on={self.early_stop_on!r} is not one of "
                f"{list(EARLY_STOP_ON)}"
            )
        if int(self.chunk_tokens) < 1:
            raise ConfigError(f"target.chunk_tokens={self.chunk_tokens} must be >= 1")
        if int(self.most_probable_steps) < 1:
            raise ConfigError(
                f"target.most_probable_steps={self.most_probable_steps} must be >= 1")
        if int(self.length_groups) < 1:
            raise ConfigError(f"target.length_groups={self.length_groups} must be >= 1")
        if self.nas_anchor is not None and not (
                isinstance(self.nas_anchor, (int, float)) and 0.0 < self.nas_anchor < math.inf):
            raise ConfigError(f"target.nas_anchor={self.nas_anchor!r} must be a finite number "
                              "> 0 (the unedited model's mean ‖v*‖), or null (NAS off)")
        if not (isinstance(self.nas_skip_factor, (int, float))
                and 1.0 <= self.nas_skip_factor <= math.inf):
            raise ConfigError(f"target.nas_skip_factor={self.nas_skip_factor!r} must be in "
                              "[1, inf]")


@dataclass(frozen=True)
class _Row:
    """One prompt row of a request's loss: a prefixed rewrite prompt teacher-forced on the
    new target (a :class:`~kaedit.tokens.TeacherForced` pair: the row is ``prompt +
    target[:-1]``), or the KL prompt."""

    request: int
    #: NLL rows: the prefixed prompt; KL rows: the KL prompt up to its read column (later
    #: tokens cannot change a causal LM's logits at the read columns).
    prompt: tuple[int, ...]
    #: Column of the last subject token: where the deltas are added.
    subject: int
    #: NLL rows: the new target's ids; KL rows: empty.
    target: tuple[int, ...] = ()

    @property
    def is_kl(self) -> bool:
        return not self.target

    @property
    def ids(self) -> tuple[int, ...]:
        """The row's token ids, only as far as the loss reads."""
        return TeacherForced.row_ids(self.prompt, self.target) if self.target else self.prompt

    @property
    def reads(self) -> tuple[int, ...]:
        """Columns whose logits the loss reads: those predicting the target's tokens (NLL
        rows, as :class:`~kaedit.tokens.TeacherForced` places them), the last (KL rows)."""
        first = len(self.prompt) - 1
        return tuple(range(first, first + max(len(self.target), 1)))


def _request_rows(
    tok, i: int, request: EditRequest, templates: Sequence[str], cfg: TargetConfig
) -> list[_Row]:
    """The NLL rows (one per template: prompt + target[:-1]) and the KL row of a request."""
    tgt = target_ids(tok, request.target_new)
    rows = []
    for t in templates:
        e = encode(tok, prompt_template(t, request), request.subject)
        rows.append(_Row(i, e.ids, e.subject_last, tgt))
    e = encode(tok, cfg.kl_prompt, request.subject)
    col = e.subject_last if cfg.kl_position == "subject_last" else len(e.ids) - 1
    rows.append(_Row(i, e.ids[: col + 1], e.subject_last))
    return rows


def _first_run_column(row: _Row, fast: bool) -> int:
    """First column a step runs: the last subject token (fast path) or 0 (full)."""
    return row.subject if fast else 0


def _chunk_cost(rows: Sequence[_Row], fast: bool) -> int:
    """Token positions one step runs for ``rows``: rows × padded width."""
    width = max(len(r.ids) - _first_run_column(r, fast) for r in rows)
    return len(rows) * width


def request_chunks(rows: Sequence[Sequence[_Row]], cfg: TargetConfig) -> list[slice]:
    """Consecutive requests grouped so each group's step stays within ``chunk_tokens``
    (a request alone may exceed it: requests are never split)."""
    out, start, acc = [], 0, []
    for i, rs in enumerate(rows):
        if acc and _chunk_cost([*acc, *rs], cfg.fast) > cfg.chunk_tokens:
            out.append(slice(start, i))
            start, acc = i, []
        acc.extend(rs)
    if rows:
        out.append(slice(start, len(rows)))
    return out


@dataclass
class _Prefix:
    """Keys/values of every row's positions before its last subject token (issue 15).

    Those positions come before every δ (all deltas sit at the last subject token, and
    attention is causal), so they are the same at every layer in every step: one no-grad
    forward computes them, and each step attends to them through a transformers cache
    built anew from these tensors (caches append in place, so reusing one would grow it).
    Rows are right-padded to the longest prefix; the padding slots are masked out in the
    steps. The prefix forward itself needs no mask: with right padding, real positions
    precede the padding, so causality already keeps padding out of them (and no query is
    left with nothing to attend to, which would give NaN keys/values).
    """

    #: Per layer (keys, values), each ``[rows, kv_heads, P, head_dim]``; empty if P = 0.
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    #: ``[rows, P]`` 1 on real prefix tokens, 0 on padding.
    mask: torch.Tensor
    #: ``[rows]`` prefix length = position id of the row's first run token.
    length: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, lm: LoadedModel, prefixes: Sequence[Sequence[int]]) -> _Prefix:
        from transformers import DynamicCache

        dev = lm.device
        length = torch.tensor([len(p) for p in prefixes], device=dev)
        width = int(length.max()) if len(prefixes) else 0
        if width == 0:
            return cls([], torch.zeros((len(prefixes), 0), dtype=torch.long, device=dev), length)
        ids, mask = pad(prefixes, lm.tokenizer.pad_token_id, dev)  # [rows, P] right-padded
        cache = DynamicCache(config=lm.model.config)
        final_hidden(lm.model, lm.spec, ids, None, past_key_values=cache)  # fills cache
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(kv, mask, length)

    def _after(self, lm: LoadedModel, rows: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> dict:
        """Arguments of a forward of the run columns ``ids`` ``[len(rows), S]`` of the
        selected rows after their prefix: a fresh cache of it, the mask ``[r, P + S]``
        and the true position ids ``[r, S]``."""
        from transformers import DynamicCache

        cache = None
        if self.kv:
            cache = DynamicCache(
                [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.kv],
                config=lm.model.config,
            )
        full_mask = torch.cat([self.mask[rows], mask], dim=1)  # [r, P + S]
        pos = self.length[rows, None] + torch.arange(ids.shape[1], device=ids.device)  # [r, S]
        return {"mask": full_mask, "position_ids": pos, "past_key_values": cache}

    def hidden(self, lm: LoadedModel, rows: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor, start: int = 0,
               block_input: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[len(rows), S, d]`` of the run columns ``ids`` ``[len(rows),
        S]`` (right-padded, ``mask`` ``[len(rows), S]``) of the selected rows; from block
        ``start`` on, given its input there (:meth:`block_input`), if ``start`` > 0."""
        return final_hidden(lm.model, lm.spec, ids, **self._after(lm, rows, ids, mask),
                            start=start, block_input=block_input)

    def block_input(self, lm: LoadedModel, layer: int, ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """Input of block ``layer`` at the run columns of every row ``[rows, S, d]``."""
        rows = torch.arange(ids.shape[0], device=ids.device)
        return block_inputs(lm.model, lm.spec, layer, ids, **self._after(lm, rows, ids, mask))


def optimize_targets(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    modules: Sequence[str],
    cfg: TargetConfig,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Optimise one additive delta per (request, module) at the last subject token.

    Returns ``{module: (init [n, d], delta [n, d])}``: the module's original output at the
    last subject token of the plain prompt, and the optimised delta, so the target value
    is ``init + delta``. Loss per request (MEMIT eq. 16, PMET/AdaPLE eq. 25): mean NLL of
    the new object over the prefixed prompts + ``kl_factor`` · KL(edited ‖ original) on
    ``kl_prompt`` + ``weight_decay`` · ‖δ‖/‖init‖² (MEMIT's form) summed over modules, each
    delta clamped to ``clamp_norm_factor`` · ‖init‖. Requests are independent: their
    losses are summed, so each delta gets exactly its own request's gradient, and each
    stops on its own total loss. Hence they are optimised in chunks under
    ``cfg.chunk_tokens`` with the same result.

    Fast path (``cfg.fast``, issue 15): every delta is added at a row's last subject token,
    so the positions before it never change; they run once (:class:`_Prefix`) and each
    step runs every layer on the columns from the subject token on only, attending to the
    cached prefix, with each row's true position ids. Rows also stop at the last column
    the loss reads (the KL row at its subject token by default).
    """
    tok = lm.tokenizer
    rows = [_request_rows(tok, i, r, templates, cfg) for i, r in enumerate(requests)]
    parts = [
        _optimize_chunk(lm, requests[sl], [replace(r, request=r.request - sl.start)
                                           for rs in rows[sl] for r in rs], modules, cfg)
        for sl in request_chunks(rows, cfg)
    ]
    out = {m: (torch.cat([p[m][0] for p in parts]), torch.cat([p[m][1] for p in parts]))
           for m in modules}
    if cfg.nas_anchor is not None:
        out = apply_nas(lm, requests, out, cfg.nas_anchor, cfg.nas_skip_factor)
    return out


# ------------------------------------------------------------------------------ NAS
def nas_scale(v_star: torch.Tensor, v0: torch.Tensor, anchor: float,
              skip_factor: float) -> torch.Tensor:
    """Norm-Anchor Scaling of value vectors ``v_star`` ``[n, d]`` (one per row).

    SasyaTitech/NAS ``NAS/compute_z.py`` l. 219-229 (the same in its
    ``baselines/memit/compute_z.py`` l. 211-222): a row with ‖v*‖ > ``skip_factor`` ·
    ``anchor`` is replaced by its ``v0`` (the MLP output before the edit: that request is
    not edited); every other row is rescaled to norm ``anchor`` (``util/vstar_stats.py``
    l. 35-42, ``scale_vector_to_norm``). A zero row stays zero."""
    norm = v_star.norm(dim=1, keepdim=True)  # [n, 1]
    tiny = torch.finfo(v_star.dtype).tiny
    scaled = torch.where(norm > 0, v_star * (anchor / norm.clamp_min(tiny)), v_star)
    return torch.where(norm > skip_factor * anchor, v0, scaled)


def nas_v0(lm: LoadedModel, module: str, requests: Sequence[EditRequest],
           init: torch.Tensor) -> torch.Tensor | None:
    """v0 ``[n, d]`` of a target at ``module``: the MLP output of the model as it is (before
    this step's edit) at the last subject token of the plain prompt. At an MLP output the
    target's own ``init``; at a block's output (MEMIT's, AlphaEdit's z) the MLP output of
    that block, so that v* = v0 + δ (the
    reference's ``res_pre_mlp = target_init − v0``, ``v_star = delta + v0``,
    NAS/compute_z.py l. 202-216). None for any other module (PMET's attention output)."""
    layer = lm.spec.layer_of(module)
    if layer is None:
        return None
    mlp = lm.spec.module("mlp_out", layer)
    if module == mlp:
        return init
    if module == lm.spec.module("layer", layer):
        return hidden_at_subject(lm, mlp, requests)
    return None


def apply_nas(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    anchor: float,
    skip_factor: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`optimize_targets`'s ``{module: (init, delta)}`` with NAS applied to every value
    vector v* = v0 + δ (:func:`nas_v0`): δ becomes nas_scale(v*) − v0 (:func:`nas_scale`),
    so the target init + δ is the reference's ``res_pre_mlp + v_star``. Other modules
    (attention outputs) are unchanged."""
    out = {}
    for module, (init, delta) in targets.items():
        v0 = nas_v0(lm, module, requests, init)
        if v0 is not None:
            v0 = v0.to(delta.dtype)
            delta = nas_scale(v0 + delta, v0, anchor, skip_factor) - v0
        out[module] = (init, delta)
    return out


def upper_trimmed_mean(values: torch.Tensor, upper_quantile: float = 0.95) -> float:
    """Mean of ``values`` without the largest ``floor((1 − q)·n)`` of them, in float64
    (SasyaTitech/NAS ``util/vstar_stats.py`` l. 358-374, ``_upper_trimmed_mean``)."""
    if not 0.0 < upper_quantile <= 1.0:
        raise ValueError(f"upper_quantile={upper_quantile} must be in (0, 1]")
    v = values.detach().double().flatten().sort().values
    drop = math.floor((1.0 - upper_quantile) * v.numel())
    kept = v[: v.numel() - drop]
    if kept.numel() == 0:
        raise ValueError("upper_trimmed_mean: no values left")
    return float(kept.mean())


def nas_anchor(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    cfg: TargetConfig,
    upper_quantile: float = 0.95,
) -> float:
    """NAS's anchor: the mean ‖v*‖ over ``requests`` on the model as it is (call it on the
    unedited model), the largest 5 % left out.

    As SasyaTitech/NAS ``util/vstar_stats.py`` (l. 206-352: ``nas_restart`` = 1000
    CounterFact rewrites drawn with seed 0; ``_compute_vstar_norms_batched`` l. 419-612): δ
    is optimised at the output of block ``layer`` on the bare prompts (no context
    templates), v* = v0 + δ with v0 the unedited MLP output there, and the upper 5 % of
    the norms are dropped before the mean. Targets are optimised with ``cfg`` (NAS off)."""
    module = lm.spec.module("layer", layer)
    plain = replace(cfg, nas_anchor=None)
    init, delta = optimize_targets(lm, requests, ["{}"], [module], plain)[module]
    v0 = nas_v0(lm, module, requests, init)
    assert v0 is not None  # a block's output always has one
    return upper_trimmed_mean((v0 + delta).norm(dim=1), upper_quantile)


def first_block(lm: LoadedModel, modules: Sequence[str]) -> int:
    """The lowest decoder block holding one of ``modules``: the blocks below it compute the
    same whatever deltas are added to those modules. 0 if a module is outside the blocks."""
    blocks = [lm.spec.layer_of(m) for m in modules]
    return 0 if not blocks or None in blocks else min(b for b in blocks if b is not None)


def length_groups(lengths: Sequence[int], max_groups: int) -> list[list[int]]:
    """Row indices grouped by length (shortest first) into at most ``max_groups`` groups
    that minimise the padded positions Σ rows × longest row (dynamic programming over the
    distinct lengths). Each group is run as its own padded forward pass."""
    values = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == v) for v in values]
    m, k = len(values), max(1, min(max_groups, len(values)))
    # best[g][i]: least cost of the first i distinct lengths in g groups; cut: where the
    # last of those groups starts.
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for i in range(1, m + 1):
            rows = 0
            for j in range(i - 1, -1, -1):  # the last group holds distinct lengths j..i-1
                rows += count[j]
                cost = best[g - 1][j] + rows * values[i - 1]
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, j
    g = min(range(1, k + 1), key=lambda x: best[x][m])
    bounds, i = [], m
    while i > 0:
        bounds.append((cut[g][i], i))
        i, g = cut[g][i], g - 1
    groups = []
    for lo, hi in reversed(bounds):
        keep = set(values[lo:hi])
        groups.append([r for r, x in enumerate(lengths) if x in keep])
    return groups


@dataclass
class _Group:
    """Rows of one chunk run together as one padded forward pass."""

    #: Chunk row indices ``[g]`` (on the model's device).
    rows: torch.Tensor
    #: Run columns, right-padded ``[g, S]``, and their mask.
    ids: torch.Tensor
    mask: torch.Tensor
    #: Cached prefix (fast path) or None (full recomputation).
    prefix: _Prefix | None
    #: Input of the first block each step runs, at the run columns ``[g, S, d]``
    #: (``TargetConfig.from_edit_layer``), or None: every step runs every block.
    block_input: torch.Tensor | None = None


def _optimize_chunk(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    rows: Sequence[_Row],
    modules: Sequence[str],
    cfg: TargetConfig,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`optimize_targets` for one chunk: per step, one padded forward per group of
    rows of similar length (``cfg.length_groups``), one backward."""
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    n = len(requests)
    first = [_first_run_column(r, cfg.fast) for r in rows]
    start = first_block(lm, modules) if cfg.from_edit_layer else 0
    groups = []
    for members in length_groups([len(r.ids) - f for r, f in zip(rows, first, strict=True)],
                                 cfg.length_groups):
        ids, mask = pad([rows[j].ids[first[j]:] for j in members], tok.pad_token_id, dev)
        prefix = (_Prefix.build(lm, [rows[j].ids[: first[j]] for j in members])
                  if cfg.fast else None)
        block_in = None
        if start:  # the clean input of block `start`: no delta is added below it
            block_in = (prefix.block_input(lm, start, ids, mask) if prefix is not None
                        else block_inputs(model, lm.spec, start, ids, mask))
        groups.append(_Group(torch.tensor(members, device=dev), ids, mask, prefix, block_in))
    row_req_t = torch.tensor([r.request for r in rows], device=dev)
    row_subj_t = torch.tensor([r.subject - f for r, f in zip(rows, first, strict=True)], device=dev)

    # Original outputs of each module at the plain prompt's subject token: the "init".
    inits = {m: hidden_at_subject(lm, m, requests) for m in modules}
    d = {m: torch.zeros_like(inits[m], requires_grad=True) for m in modules}  # [n, d]
    opt = torch.optim.Adam(list(d.values()), lr=cfg.lr)
    max_norm = {m: cfg.clamp_norm_factor * inits[m].norm(dim=1, keepdim=True) for m in modules}

    # The NLL rows as teacher-forced pairs, in chunk order (pair k is chunk row
    # nll_row[k]): the column predicting each target token, its id, and its pair.
    nll_row = [j for j, r in enumerate(rows) if not r.is_kl]
    kl_row = [j for j, r in enumerate(rows) if r.is_kl]
    forced = TeacherForced.from_ids([(rows[j].prompt, rows[j].target) for j in nll_row],
                                    tok.pad_token_id, dev)
    n_tok = len(forced.tok)
    nll_row_t = torch.tensor(nll_row, dtype=torch.long, device=dev)
    pair_req_t = row_req_t[nll_row_t]  # [pairs] the request of each NLL row
    # Reads: the target tokens (read k < n_tok is forced token k), then one per KL row at
    # its last column; the LM head runs on these positions alone. Columns are counted from
    # each row's first run column.
    read_row = torch.cat([nll_row_t[forced.row],
                          torch.tensor(kl_row, dtype=torch.long, device=dev)])
    read_col = torch.cat([forced.col, torch.tensor([rows[j].reads[0] for j in kl_row],
                                                   dtype=torch.long, device=dev)])
    read_col = read_col - torch.tensor(first, dtype=torch.long, device=dev)[read_row]
    is_kl = torch.arange(len(read_row), device=dev) >= n_tok
    kl_slot = torch.cumsum(is_kl.long(), 0) - 1  # read -> its row in kl_init (KL reads)
    templates_per_req = torch.bincount(pair_req_t, minlength=n).float()

    active = torch.ones(n, dtype=torch.bool)
    argmax_steps = torch.zeros(n, dtype=torch.long)  # MPES: steps with every token the argmax
    kl_init: torch.Tensor | None = None  # [KL reads, vocab] log-probs of the original model
    for step in range(cfg.steps):
        # Only the rows of requests still optimising (all of them at step 0, when the KL
        # reference distribution is taken).
        running = active.to(dev)[row_req_t]  # [rows]
        vectors, which = [], []
        for g in groups:
            run = g.rows[running[g.rows]]  # chunk rows of this group still optimising
            if len(run) == 0:
                continue
            local = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
            local[run] = torch.arange(len(run), device=dev)
            sel = running[g.rows].nonzero().squeeze(1)  # positions of `run` in the group

            def add_delta(m: str, run: torch.Tensor = run):
                def fn(h: torch.Tensor) -> torch.Tensor:
                    h = h.clone()
                    h[torch.arange(len(run), device=dev), row_subj_t[run]] += d[m][
                        row_req_t[run]
                    ].to(h.dtype)
                    return h

                return fn

            with edit_outputs(model, {m: add_delta(m) for m in modules}):
                block_in = None if g.block_input is None else g.block_input[sel]
                if g.prefix is None:
                    hidden = final_hidden(model, lm.spec, g.ids[sel], g.mask[sel],
                                          start=start, block_input=block_in)
                else:
                    hidden = g.prefix.hidden(lm, sel, g.ids[sel], g.mask[sel], start, block_in)
            mine = (local[read_row] >= 0).nonzero().squeeze(1)  # reads of these rows
            vectors.append(hidden[local[read_row[mine]], read_col[mine]])
            which.append(mine)
        which_t = torch.cat(which)
        logp = torch.log_softmax(lm_head(model, lm.spec, torch.cat(vectors)).float(), dim=-1)

        nll_at = ~is_kl[which_t]
        tok_at = which_t[nll_at]  # forced token of each NLL read, in the order of `logp`
        tok_nll = -logp[nll_at].gather(1, forced.tok[tok_at, None]).squeeze(1)
        # Token-mean NLL of each NLL row [pairs]; the tokens of stopped requests are not
        # run and count as 0 (their requests' losses are masked out of the backward).
        per_token = torch.zeros(n_tok, device=dev).index_put((tok_at,), tok_nll)
        row_nll = forced.pair_mean(per_token)
        req_nll = torch.zeros(n, device=dev).index_add(
            0, pair_req_t, row_nll) / templates_per_req

        kl_reads = which_t[~nll_at]
        kl_logp = logp[~nll_at]
        if kl_init is None:  # step 0: deltas are zero -> the original model
            kl_init = torch.zeros((int(is_kl.sum()), kl_logp.shape[1]), device=dev)
            kl_init[kl_slot[kl_reads]] = kl_logp.detach()
        # KL(edited ‖ original), as MEMIT/PMET: kl_div(input=log q_orig, target=log p_edit)
        kl = F.kl_div(kl_init[kl_slot[kl_reads]], kl_logp, log_target=True,
                      reduction="none").sum(1)
        req_kl = torch.zeros(n, device=dev).index_add(0, row_req_t[read_row[kl_reads]], kl)

        decay = sum(
            d[m].norm(dim=1) / inits[m].pow(2).sum(1).clamp_min(1e-12) for m in modules
        )
        loss_req = req_nll + cfg.kl_factor * req_kl + cfg.weight_decay * decay
        # Early stop on the total loss as kmeng01/memit compute_z.py (``loss < 5e-2``), or
        # on the NLL alone (``early_stop_on``).
        stop_loss = req_nll if cfg.early_stop_on == "nll" else loss_req
        done = (stop_loss.detach() < cfg.early_stop_loss).cpu()
        if cfg.early_stop_on == "most_probable":
            # ENCORE's MPES: every forced token of the request's running NLL rows is the
            # argmax (ENCORE's code checks its rows [1:], leaving out the plain prompt; the
            # paper and issue 30 ask for all prompts, as here).
            wrong = (logp[nll_at].detach().argmax(1) != forced.tok[tok_at]).float()
            req_wrong = torch.zeros(n, device=dev).index_add(
                0, pair_req_t[forced.owner[tok_at]], wrong)
            argmax_steps += ((req_wrong == 0).cpu() & active).long()
            done |= argmax_steps >= cfg.most_probable_steps
        active &= ~done
        if not active.any() or step == cfg.steps - 1:
            break
        opt.zero_grad()
        (loss_req * active.to(dev).float()).sum().backward()
        frozen = {m: d[m].detach().clone() for m in modules}
        opt.step()
        with torch.no_grad():
            for m in modules:
                d[m][~active.to(dev)] = frozen[m][~active.to(dev)]  # converged: keep as is
                norm = d[m].norm(dim=1, keepdim=True)
                d[m].mul_(torch.where(norm > max_norm[m], max_norm[m] / norm, 1.0))
    return {m: (inits[m], d[m].detach()) for m in modules}


#: ``solve(layer, resid [d_out, n], keys [d_in, n], weight [d_out, d_in]) -> Δ_l``;
#: ``weight`` is the layer's current down-projection (earlier layers' updates included).
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def spread_residual(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    z: torch.Tensor,
    z_module: str,
    solve: LayerSolver,
    share: Callable[[int], float] = float,
    clock: Stopwatch | None = None,
    fuse: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Deltas:
    """Spread the change z − cur over the edit layers' down-projections, in order.

    For edit layer l (the updates of the earlier layers temporarily in place): keys K at l,
    cur = output of ``z_module`` at the last subject token, R = (z − cur) / share(layers
    left, l included), Δ_l = ``solve(l, R, K, W_l)``. ``share=float`` is MEMIT's even spread,
    ``math.sqrt`` PMET's / AdaPLE's (Algorithm 1). ``z`` is ``[n, d]``.

    ``fuse`` (``fusion.scope=layer``, ``EditContext.layer_fusion``): the update of layer l
    kept in place for the later layers is ``fuse(name, Δ_l)`` (Algorithm 1: W₁ˡ ← W₀ˡ + Δ̂ˡ
    inside the loop), so their keys and residual see what was dropped and compensate.
    Without it the undropped Δ_l stays in place (MEMIT/PMET; fusion after the loop).

    Returns ``{down-projection weight name: Δ_l}`` (float32), undropped (the runner fuses
    them with the same function); the model is left unchanged. Time goes to ``clock``'s
    stages "keys" (keys and current outputs) and "solve".
    """
    clock = clock or Stopwatch()
    deltas: Deltas = {}
    in_place: Deltas = {}  # what the later layers see: Δ_l, or fuse(Δ_l) at layer scope
    with clock("keys"):  # blocks below the lowest edited one never change in this loop:
        # their output, the input of that block, is computed once (issue 30)
        start = first_block(lm, [lm.spec.module("mlp_out", layer) for layer in layers])
        key_in = BlockStart.build(lm, key_encodings(lm, requests, templates), start)
        plain_in = BlockStart.build(lm, plain_encodings(lm, requests), start)
    for i, layer in enumerate(layers):
        name = lm.spec.weight("mlp_out", layer)
        with clock("keys"), applied(lm.model, in_place):  # earlier layers' updates in place
            keys = compute_keys(lm, layer, requests, templates, prepared=key_in)  # [d_in, n]
            cur = hidden_at_subject(lm, z_module, requests, prepared=plain_in)  # [n, d]
            weight = lm.spec.as_linear("mlp_out", lm.model.get_parameter(name))
            weight = weight.detach().clone()  # [d_out, d_in]
        resid = (z - cur).T / share(len(layers) - i)  # [d_out, n]
        with clock("solve"):  # stored in the weight's own layout (GPT-2: [d_in, d_out])
            deltas[name] = lm.spec.to_param("mlp_out", solve(layer, resid, keys, weight)
                                            .to(torch.float32))
        in_place[name] = deltas[name] if fuse is None else fuse(name, deltas[name])
    return deltas


def solve_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    kk_coef: float = 1.0,
    ridge: float = 0.0,
    prev_kk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + μI + K_p K_pᵀ + c·K Kᵀ)⁻¹ in float64 (paper eq. 2 with c=1; eq. 4
    with c=2; μ = ``ridge`` and K_p K_pᵀ = ``prev_kk`` are 0 unless given).

    ``resid`` R ``[d_out, n]``, ``keys`` K ``[d_in, n]``, ``cov`` C ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` (the orientation of ``nn.Linear.weight``). Solved as
    A X = K with A symmetric, then Δ = R Xᵀ, never forming an inverse.

    With ``ridge`` and ``prev_kk`` (ENCORE, :mod:`kaedit.methods.encore`) Δ minimises
    ‖ΔK − R‖² + λ tr(ΔCΔᵀ) + μ‖Δ‖²_F + ‖ΔK_p‖² (c = 1): a Frobenius-norm penalty on the
    update and the keys K_p of earlier edits kept where they are.
    """
    K = keys.double()
    A = lam * cov.double()  # [d_in, d_in]
    if ridge:
        A.diagonal().add_(ridge)
    if prev_kk is not None:
        A = A + prev_kk.to(device=A.device, dtype=torch.float64)
    A = A + kk_coef * (K @ K.T)
    X = torch.linalg.solve(A, K)  # [d_in, n] = A⁻¹ K
    return (resid.double() @ X.T).float()
