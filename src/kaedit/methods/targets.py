"""Target values for all requests of a batch at once (MEMIT eq. 16 / PMET / AdaPLE eq. 25).

:func:`optimize_targets` optimises additive deltas at the last subject token of chosen
modules jointly (padded forwards grouped by row length, one backward per step) with
independent per-request losses and early stopping; positions before the subject token
are computed once and cached (``TargetConfig.fast``), and requests are taken in chunks
under a memory budget (``TargetConfig.chunk_tokens``). Norm-Anchor Scaling
(:mod:`kaedit.methods.nas`) is applied to the result when ``TargetConfig.nas_anchor`` is
set; :func:`nas_anchor` computes the anchor on the unedited model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kaedit.hooks import edit_outputs
from kaedit.methods.keys import first_block, hidden_at_subject
from kaedit.methods.nas import apply_nas, nas_v0, upper_trimmed_mean
from kaedit.methods.templates import prompt_template
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.tokens import (
    TeacherForced,
    block_inputs,
    encode,
    final_hidden,
    lm_head,
    pad,
    target_ids,
)

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
    #: PMET's NLL down-weighting (xpq-tech/PMET ``edit/pmet/compute_zs.py``: ``if max_prob
    #: == prob: nll_loss_factor = 0.1 * hparams.nll_loss_factor``): at a step where the new
    #: object is the argmax at every target token of every prompt of a request, that
    #: request's NLL term is weighted by this factor from the next step on, and by 1 again
    #: once it is not. 1.0: off (MEMIT's and ROME's loss); PMET's code: 0.1.
    argmax_nll_factor: float = 1.0
    #: PMET's KL stop, the other half of the same branch (``if kl_loss <= 0.01: break``): a
    #: request whose new object is the argmax everywhere also stops once its weighted KL
    #: term (``kl_factor`` · KL) is at most this. None: off; PMET's code: 0.01.
    argmax_kl_stop: float | None = None
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
        if not (isinstance(self.argmax_nll_factor, (int, float))
                and 0.0 <= self.argmax_nll_factor <= 1.0):
            raise ConfigError(f"target.argmax_nll_factor={self.argmax_nll_factor!r} must be "
                              "in [0, 1] (1: off; PMET's code: 0.1)")
        if self.argmax_kl_stop is not None and not (
                isinstance(self.argmax_kl_stop, (int, float)) and self.argmax_kl_stop >= 0.0):
            raise ConfigError(f"target.argmax_kl_stop={self.argmax_kl_stop!r} must be a "
                              "number >= 0 (PMET's code: 0.01), or null (off)")
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
    nll_weight = torch.ones(n, device=dev)  # PMET's down-weighting (``argmax_nll_factor``)
    check_argmax = (cfg.early_stop_on == "most_probable" or cfg.argmax_nll_factor != 1.0
                    or cfg.argmax_kl_stop is not None)
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
        loss_req = nll_weight * req_nll + cfg.kl_factor * req_kl + cfg.weight_decay * decay
        # Early stop on the total loss as kmeng01/memit compute_z.py (``loss < 5e-2``), or
        # on the NLL alone (``early_stop_on``).
        stop_loss = req_nll if cfg.early_stop_on == "nll" else loss_req
        done = (stop_loss.detach() < cfg.early_stop_loss).cpu()
        if check_argmax:
            # Every forced token of the request's running NLL rows is the argmax (ENCORE's
            # code checks its rows [1:], leaving out the plain prompt; the paper and issue
            # 30 ask for all prompts, as here; PMET's ``max_prob == prob`` reads all).
            wrong = (logp[nll_at].detach().argmax(1) != forced.tok[tok_at]).float()
            argmax = torch.zeros(n, device=dev).index_add(
                0, pair_req_t[forced.owner[tok_at]], wrong) == 0
            if cfg.early_stop_on == "most_probable":  # ENCORE's MPES
                argmax_steps += (argmax.cpu() & active).long()
                done |= argmax_steps >= cfg.most_probable_steps
            if cfg.argmax_kl_stop is not None:  # PMET: stop once the KL term is small
                done |= (argmax & (cfg.kl_factor * req_kl.detach()
                                   <= cfg.argmax_kl_stop)).cpu()
            # PMET: the factor the next step's NLL is weighted by (this step's loss, and
            # so its gradient, keep the factor they were computed with)
            nll_weight = torch.where(argmax, cfg.argmax_nll_factor, 1.0)
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
