"""Maths shared by the locate-then-edit methods (MEMIT, PMET, AdaPLE, AlphaEdit, ROME).

* :func:`context_templates` -- generated prefixes, made once per run (MEMIT §3).
* :func:`compute_keys` -- k^l: input of the edited projection at the last subject token,
  averaged over prefixed prompts (MEMIT eq. 17; AdaPLE eq. 26).
* :func:`optimize_targets` -- target values for all requests of a batch at once: additive
  deltas at the last subject token of chosen modules, optimised jointly in one padded
  forward/backward per step with independent per-request losses and early stopping
  (MEMIT eq. 16 / PMET / AdaPLE eq. 25).
* :func:`solve_update` -- the closed form Δ = R Kᵀ (λC + c·K Kᵀ)⁻¹ (paper eq. 2 and 4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kaedit.hooks import StopForward, edit_outputs, trace
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.sampling import SeededTopK as _SeededTopK
from kaedit.timing import Stopwatch
from kaedit.tokens import Encoded, chunks, encode, final_hidden, lm_head, pad, target_ids
from kaedit.weights import applied


def context_templates(
    lm: LoadedModel,
    specs: Sequence[Sequence[int]] = ((10, 5),),
    starts: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    seed: int = 0,
) -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: prefixes that make edits generalise.

    For each ``(length, count)`` in ``specs``, ``count`` continuations of ``length`` tokens
    are sampled (top-k 5) from the start words, with a CPU generator seeded anew for each
    spec: the same templates on every device, and the global RNG untouched.
    """
    from transformers import LogitsProcessorList

    model, tok = lm.model, lm.tokenizer
    out = ["{}"]
    for length, count in specs:
        sampler = _SeededTopK(5, seed)  # each spec starts from the seed
        per_start = max(1, count // len(starts))
        enc = [list(tok(s)["input_ids"]) for s in starts for _ in range(per_start)]
        # left-padded so every row continues from its last real token
        ids, mask = pad(enc, tok.pad_token_id, lm.device, left=True)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
            logits_processor=LogitsProcessorList([sampler]), pad_token_id=tok.pad_token_id,
        )
        for row, m in zip(gen, mask):
            text = tok.decode(row[int(width - m.sum()) :], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


def prompt_template(context: str, request: EditRequest) -> str:
    """A context template applied to the request's prompt: still one ``{}`` (the subject)."""
    return context.replace("{}", request.prompt.replace("{}", "\x00"), 1).replace("\x00", "{}")


@torch.no_grad()
def compute_keys(
    lm: LoadedModel,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    module_kind: str = "mlp_out",
    batch_size: int = 64,
) -> torch.Tensor:
    """K ``[d_in, n_requests]``: mean over templates of the key at the last subject token."""
    module = lm.spec.module(module_kind, layer)
    encs = [encode(lm.tokenizer, prompt_template(t, r), r.subject) for r in requests
            for t in templates]
    keys = _module_io_at(lm, module, encs, batch_size, want_input=True)  # [n*T, d_in]
    return keys.view(len(requests), len(templates), -1).mean(1).T


@torch.no_grad()
def hidden_at_subject(
    lm: LoadedModel, module: str, requests: Sequence[EditRequest], batch_size: int = 64
) -> torch.Tensor:
    """Output of ``module`` at the last subject token of each plain prompt ``[n, d]``."""
    encs = [encode(lm.tokenizer, r.prompt, r.subject) for r in requests]
    return _module_io_at(lm, module, encs, batch_size, want_input=False)


def _module_io_at(lm, module: str, encs: list[Encoded], batch_size: int, want_input: bool):
    rows = []
    for sl in chunks(len(encs), batch_size):
        batch = encs[sl]
        ids, mask = pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
        with trace(lm.model, [module], inputs=want_input, outputs=not want_input,
                   stop=True) as tr, contextlib.suppress(StopForward):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        h = tr[module].input if want_input else tr[module].output
        idx = torch.tensor([e.subject_last for e in batch], device=h.device)
        rows.append(h[torch.arange(len(batch), device=h.device), idx].float())
    return torch.cat(rows)


@dataclass(frozen=True)
class TargetConfig:
    """Hyper-parameters of target-value optimisation (MEMIT's v*, PMET's δᵃ/δᵐ)."""

    lr: float = 0.5
    steps: int = 25
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    #: Stop optimising a request once its loss is below this (per request).
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"


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
    delta clamped to ``clamp_norm_factor`` · ‖init‖. Requests are independent: their losses are summed,
    so each delta gets exactly its own request's gradient.
    """
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    n = len(requests)
    targets = [target_ids(tok, r.target_new) for r in requests]

    # Rows: every template for every request (NLL rows), then one KL row per request.
    row_req, row_ids, row_subj, row_tgt_start = [], [], [], []
    for i, (r, tgt) in enumerate(zip(requests, targets)):
        for t in templates:
            e = encode(tok, prompt_template(t, r), r.subject)
            row_req.append(i)
            row_ids.append(list(e.ids) + list(tgt[:-1]))
            row_subj.append(e.subject_last)
            row_tgt_start.append(len(e.ids))
    n_nll = len(row_req)
    for i, r in enumerate(requests):
        e = encode(tok, cfg.kl_prompt, r.subject)
        row_req.append(i)
        row_ids.append(list(e.ids))
        row_subj.append(e.subject_last)
        row_tgt_start.append(len(e.ids))

    # Original outputs of each module at the plain prompt's subject token: the "init".
    inits = {m: hidden_at_subject(lm, m, requests) for m in modules}
    d = {m: torch.zeros_like(inits[m], requires_grad=True) for m in modules}  # [n, d]
    opt = torch.optim.Adam(list(d.values()), lr=cfg.lr)
    max_norm = {m: cfg.clamp_norm_factor * inits[m].norm(dim=1, keepdim=True) for m in modules}

    # Positions whose logits the loss needs; the LM head runs on these alone.
    nll_pos_row, nll_pos_col, nll_tok, nll_owner = [], [], [], []
    for row in range(n_nll):
        tgt = targets[row_req[row]]
        for j, t in enumerate(tgt):
            nll_pos_row.append(row)
            nll_pos_col.append(row_tgt_start[row] - 1 + j)
            nll_tok.append(t)
            nll_owner.append(row)
    kl_rows = list(range(n_nll, len(row_req)))
    kl_cols = [row_tgt_start[r] - 1 for r in kl_rows]

    active = torch.ones(n, dtype=torch.bool)
    kl_init: torch.Tensor | None = None
    ids_all, mask_all = pad(row_ids, tok.pad_token_id, dev)
    row_req_t = torch.tensor(row_req, device=dev)
    row_subj_t = torch.tensor(row_subj, device=dev)
    pos_r = torch.tensor(nll_pos_row, device=dev)
    pos_c = torch.tensor(nll_pos_col, device=dev)
    tok_t = torch.tensor(nll_tok, device=dev)
    owner_t = torch.tensor(nll_owner, device=dev)
    n_tgt_tokens = torch.tensor([len(targets[row_req[r]]) for r in range(n_nll)], device=dev)
    templates_per_req = torch.bincount(row_req_t[:n_nll], minlength=n).float()

    for step in range(cfg.steps):
        # Only the rows of requests still optimising (all of them at step 0, when the KL
        # reference distribution is taken).
        rows = torch.nonzero(active[row_req_t.cpu()]).squeeze(1).to(dev)
        remap = torch.full((len(row_req),), -1, dtype=torch.long, device=dev)
        remap[rows] = torch.arange(len(rows), device=dev)

        def add_delta(m: str, rows: torch.Tensor = rows):
            def fn(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[torch.arange(len(rows), device=dev), row_subj_t[rows]] += d[m][
                    row_req_t[rows]
                ].to(h.dtype)
                return h

            return fn

        with edit_outputs(model, {m: add_delta(m) for m in modules}):
            hidden = final_hidden(model, lm.spec, ids_all[rows], mask_all[rows])

        keep = remap[pos_r] >= 0
        logits = lm_head(model, lm.spec, hidden[remap[pos_r[keep]], pos_c[keep]])
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok_nll = -logp.gather(1, tok_t[keep, None]).squeeze(1)
        row_nll = torch.zeros(len(row_req), device=dev).index_add(0, owner_t[keep], tok_nll)
        row_nll = row_nll[:n_nll] / n_tgt_tokens
        req_nll = torch.zeros(n, device=dev).index_add(0, row_req_t[:n_nll], row_nll)
        req_nll = req_nll / templates_per_req

        kl_keep = [r for r in kl_rows if remap[r] >= 0]
        kl_logp = torch.log_softmax(
            lm_head(model, lm.spec, hidden[remap[kl_keep], torch.tensor(
                [kl_cols[r - n_nll] for r in kl_keep], device=dev)]).float(), dim=-1)
        kl_req = torch.tensor([row_req[r] for r in kl_keep], device=dev)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()  # step 0: deltas are zero -> original model
        # KL(edited ‖ original), as MEMIT/PMET: kl_div(input=log q_orig, target=log p_edit)
        kl = F.kl_div(kl_init[kl_req], kl_logp, log_target=True, reduction="none").sum(1)
        req_kl = torch.zeros(n, device=dev).index_add(0, kl_req, kl)

        decay = sum(
            d[m].norm(dim=1) / inits[m].pow(2).sum(1).clamp_min(1e-12) for m in modules
        )
        loss_req = req_nll + cfg.kl_factor * req_kl + cfg.weight_decay * decay
        done = (req_nll.detach() < cfg.early_stop_loss).cpu()
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
) -> Deltas:
    """Spread the change z − cur over the edit layers' down-projections, in order.

    For edit layer l (the updates of the earlier layers temporarily in place): keys K at l,
    cur = output of ``z_module`` at the last subject token, R = (z − cur) / share(layers
    left, l included), Δ_l = ``solve(l, R, K, W_l)``. ``share=float`` is MEMIT's even spread,
    ``math.sqrt`` PMET's / AdaPLE's (Algorithm 1). ``z`` is ``[n, d]``. Returns
    ``{down-projection weight name: Δ_l}`` (float32); the model is left unchanged. Time
    goes to ``clock``'s stages "keys" (keys and current outputs) and "solve".
    """
    clock = clock or Stopwatch()
    deltas: Deltas = {}
    for i, layer in enumerate(layers):
        name = lm.spec.weight("mlp_out", layer)
        with clock("keys"), applied(lm.model, deltas):  # earlier layers' updates in place
            keys = compute_keys(lm, layer, requests, templates)  # [d_in, n]
            cur = hidden_at_subject(lm, z_module, requests)  # [n, d]
            weight = lm.model.get_parameter(name).detach().clone()  # [d_out, d_in]
        resid = (z - cur).T / share(len(layers) - i)  # [d_out, n]
        with clock("solve"):
            deltas[name] = solve(layer, resid, keys, weight).to(torch.float32)
    return deltas


def solve_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    kk_coef: float = 1.0,
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + c·K Kᵀ)⁻¹ in float64 (paper eq. 2 with c=1; eq. 4 with c=2).

    ``resid`` R ``[d_out, n]``, ``keys`` K ``[d_in, n]``, ``cov`` C ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` (the orientation of ``nn.Linear.weight``). Solved as
    A X = K with A symmetric, then Δ = R Xᵀ, never forming an inverse.
    """
    K = keys.double()
    A = lam * cov.double() + kk_coef * (K @ K.T)  # [d_in, d_in]
    X = torch.linalg.solve(A, K)  # [d_in, n] = A⁻¹ K
    return (resid.double() @ X.T).float()
