"""Keys and hidden states at the last subject token, read from the model as it is.

* :func:`compute_keys` -- k^l: input of the edited projection at the last subject token,
  averaged over prefixed prompts within each template group, then across groups (MEMIT
  eq. 17 as ``memit/compute_ks.py`` computes it; AdaPLE eq. 26).
* :func:`hidden_at_subject` -- a module's output there (the current value a target is
  compared with).
* :class:`BlockStart` -- prompt encodings with a decoder block's clean input cached, so a
  layer loop does not re-run the blocks below the lowest edited one (:func:`first_block`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kaedit.hooks import run_until, start_at
from kaedit.methods.templates import as_templates, prompt_template
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.tokens import (
    Encoded,
    block_inputs,
    chunks,
    encode,
    pad,
)


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


def first_block(lm: LoadedModel, modules: Sequence[str]) -> int:
    """The lowest decoder block holding one of ``modules``: the blocks below it compute the
    same whatever deltas are added to those modules. 0 if a module is outside the blocks."""
    blocks = [lm.spec.layer_of(m) for m in modules]
    return 0 if not blocks or None in blocks else min(b for b in blocks if b is not None)


# ------------------------------------------------------------ the earlier edits' key sums
def add_key_sum(sums: dict[int, torch.Tensor], layer: int, keys: torch.Tensor) -> None:
    """``sums[layer] += K Kᵀ`` (``keys`` K ``[d_in, n]``), summed in float64 and kept in
    float32: the earlier edits' keys that AlphaEdit projects away from and ENCORE keeps in
    its normal equations (their run state)."""
    keys = keys.double()
    kk = keys @ keys.T  # [d_in, d_in]
    if layer in sums:
        kk = kk + sums[layer].to(kk.device).double()
    sums[layer] = kk.float()


def key_sums_state(sums: dict[int, torch.Tensor], n_committed: int) -> dict[str, torch.Tensor]:
    """The key sums as a checkpoint's tensors: ``prev_kk.{layer}`` and ``n_committed``."""
    state = {f"prev_kk.{layer}": kk.detach().cpu().clone() for layer, kk in sums.items()}
    state["n_committed"] = torch.tensor(n_committed, dtype=torch.int64)
    return state


def key_sums_from_state(state: dict) -> tuple[dict[int, torch.Tensor], int]:
    """:func:`key_sums_state`'s inverse: ``(sums, n_committed)``."""
    sums = {int(k.split(".", 1)[1]): v.float().clone() for k, v in state.items()
            if k.startswith("prev_kk.")}
    return sums, int(state.get("n_committed", 0))
