"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong
Editing in Large Language Models"; code: XiaojieGu/UltraEdit ``editor/ultraedit.py``, the
same maths in zjunlp/EasyEdit ``easyeditor/models/ultraedit/ULTRAEDIT.py``).

No target optimisation, no subject, no covariance statistics. Per step, for each edited
linear module W (``nn.Linear`` orientation ``[d_out, d_in]``):

1. One forward/backward per sub-batch of the step's requests (``sub_batch``, the reference's
   ``dataset.batch_size``; requests sorted longest first, as its ``collate_fn``) on the
   rewrite prompt teacher-forced on the new object, loss = the mean cross-entropy over the
   sub-batch's answer tokens. At every answer position t (``token="ans"``: the positions
   whose logits predict an answer token) this gives the key k_t (W's input) and
   g_t = ∂loss/∂(W's output) (``editor/ultraedit.py:101-125``, ``util.py:140-200``).
2. Lifelong normalisation: running mean and variance of the concatenation [k_t; g_t] over
   the whole edit stream, one set per weight *shape* (modules of one shape share it,
   ``editor/ultraedit.py:53-58``), updated with each sub-batch before it is used
   (``nets.py:16-24``, :func:`normalizer_update`). With (k̂_t; ĝ_t) = ([k_t; g_t] − μ)/(σ + ε):

       v_t = −η ‖k̂_t‖² ĝ_t                                    (``editor/ultraedit.py:89``)

3. Closed form (ridge regression of the targets v_t on the raw keys, ``:92-94``):

       Δ = Vᵀ K (KᵀK + λI)⁻¹,   K = [k_t]ᵀ ``[N, d_in]``, V = [v_t]ᵀ ``[N, d_out]``,

   i.e. Δ minimises ‖K Δᵀ − V‖² + λ‖Δ‖² (λ = 1, the reference's identity).

The running statistics are run state: :meth:`compute_deltas` works on a copy updated with
the step's batch (so the batch is normalised with statistics that include it, as the
reference updates them in ``cache`` before ``predict_param_shifts``) and :meth:`commit`
adopts that copy only when the step was applied. ``state_dict`` holds them for resume.

Deviations from the reference (docs/methods.md lists them too):

* The statistics and the solve are float64 (the reference: float32 buffers and a float32
  solve on fp16 activations); the ε's are the reference's float32 ε.
* A sub-batch with a single answer token contributes no within-batch variance (the
  reference's unbiased ``x.var(0)`` of one row is NaN and poisons the statistics).
* Gradients are taken with respect to the module outputs only (zero leaves added with
  :func:`kaedit.hooks.edit_outputs`); the reference backpropagates into every parameter
  and leaves their ``.grad`` behind. The values of g_t are the same.
* ``EditContext.templates`` and ``layer_fusion`` are not used: UltraEdit edits the
  rewrite prompt alone and has no layer loop (``fusion.scope=layer`` fuses each Δ once
  after the method, as for FT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kaedit.errors import ConfigError
from kaedit.hooks import edit_outputs
from kaedit.methods.base import EditContext
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.tokens import TeacherForced, prompt_ids, target_ids

#: Module kinds UltraEdit can edit (linear maps of a block; ``mlp_gate`` only where the
#: model config defines it). The reference edits gate/up projections (Llama-3, Qwen2.5)
#: or down projections (Mistral, GPT-J, Phi-4).
EDITABLE_KINDS = ("mlp_in", "mlp_gate", "mlp_out", "attn_out")
#: ``ans``: keys and gradients at the positions predicting answer tokens (the reference's
#: ``editor.token: ans``, its default); ``all``: at every real token of the row (its other
#: branch, ``util.py:193-196``; EasyEdit's default ``token: mask``).
TOKENS = ("ans", "all")
#: The reference's ε (``torch.finfo(x.dtype).eps`` of its float32 statistics).
EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------- running statistics
@dataclass(frozen=True)
class RunningStats:
    """The reference's ``RunningMeanStd`` (``nets.py:5-30``) as an immutable value.

    ``m2`` is its ``var`` buffer: a running sum of squared deviations (Chan et al.'s
    pairwise update), from which σ = sqrt(m2 / (n − 1 + ε)). All float64.
    """

    n: torch.Tensor  # [] number of rows seen
    mean: torch.Tensor  # [D]
    m2: torch.Tensor  # [D]

    @classmethod
    def empty(cls, size: int, device: torch.device | str = "cpu") -> RunningStats:
        z = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    def std(self) -> torch.Tensor:
        """σ ``[D]`` = sqrt(m2 / (n − 1 + ε)) (``nets.py:23``)."""
        return (self.m2 / (self.n - 1 + EPS)).sqrt()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x − μ) / (σ + ε) (``nets.py:27-30``), rows of ``x`` ``[N, D]``."""
        return (x.double() - self.mean) / (self.std() + EPS)

    def to(self, device: torch.device | str) -> RunningStats:
        return RunningStats(self.n.to(device), self.mean.to(device), self.m2.to(device))


def normalizer_update(stats: RunningStats, x: torch.Tensor) -> RunningStats:
    """The statistics after rows ``x`` ``[b, D]`` (``nets.py:16-24``), in float64:

        n' = n + b,  δ = mean(x) − μ,  μ' = μ + b δ / n',
        m2' = m2 + b·var(x) + n b δ² / n'

    with ``var`` the unbiased per-column variance, exactly as the reference writes it (so
    the within-batch term is b/(b − 1) times the sum of squared deviations: the statistics
    are those of Chan's pooled update with that factor on every batch). For b = 1 the
    within-batch term is 0 (deviation: the reference's ``x.var(0)`` of one row is NaN).
    """
    x = x.double()
    b = x.shape[0]
    n = stats.n + b
    delta = x.mean(0) - stats.mean  # [D]
    mean = stats.mean + b * delta / n
    within = b * x.var(0) if b > 1 else torch.zeros_like(delta)
    m2 = stats.m2 + within + stats.n * b * delta.pow(2) / n
    return RunningStats(n, mean, m2)


def ultraedit_update(
    keys: torch.Tensor,
    grads: torch.Tensor,
    stats: RunningStats,
    lr: float,
    ridge: float = 1.0,
) -> torch.Tensor:
    """Δ = Vᵀ K (KᵀK + λI)⁻¹ ``[d_out, d_in]`` in float64 (``editor/ultraedit.py:78-94``).

    ``keys`` K ``[N, d_in]`` and ``grads`` G ``[N, d_out]`` (rows: answer tokens),
    ``stats`` over [k; g] ``[d_in + d_out]``. The targets are v_t = −η ‖k̂_t‖² ĝ_t with
    (k̂_t; ĝ_t) the normalised row; Δ solves the ridge regression min ‖K Δᵀ − V‖² + λ‖Δ‖²,
    computed as (KᵀK + λI) X = KᵀV, Δ = Xᵀ (the matrix is symmetric positive definite).
    """
    K = keys.double()
    d_in = K.shape[1]
    z = stats.normalize(torch.cat([K, grads.double()], dim=1))  # [N, d_in + d_out]
    k_hat, g_hat = z[:, :d_in], z[:, d_in:]
    values = -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat  # [N, d_out] V
    A = K.T @ K + ridge * torch.eye(d_in, dtype=K.dtype, device=K.device)  # [d_in, d_in]
    return torch.linalg.solve(A, K.T @ values).T  # [d_out, d_in]


# ------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class _Target:
    """One edited module."""

    kind: str
    layer: int
    module: str  # module path
    weight: str  # parameter name
    shape: tuple[int, int]  # (d_in, d_out), the reference's ``get_shape``

    @property
    def stats_key(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"


@dataclass
class UltraEdit:
    #: The edited layers (the runner checks them against the model).
    layers: Sequence[int]
    #: The edited modules, in order: ``[{kind: mlp_out}, {kind: mlp_gate, layers: [...]}]``;
    #: a kind from :data:`EDITABLE_KINDS`, at its own ``layers`` (a subset of ``layers``)
    #: or, without them, at every layer of ``layers``. A list, so a config's choice
    #: replaces the default whole. Every layer of ``layers`` must be edited by one.
    modules: Sequence[Mapping[str, Any]] = ({"kind": "mlp_out"},)
    #: η, the step size of the targets (the reference's ``editor.lr``: 1e-6).
    lr: float = 1e-6
    #: λ of the ridge (KᵀK + λI); the reference adds the identity: 1.
    ridge: float = 1.0
    #: Requests per forward/backward (the reference's ``dataset.batch_size``: 10). Each
    #: sub-batch's loss is its own token mean, and each updates the statistics once.
    sub_batch: int = 10
    #: Where keys and gradients are read: :data:`TOKENS`.
    token: str = "ans"
    #: Lifelong statistics per weight shape ``"{d_in}x{d_out}"``.
    stats: dict[str, RunningStats] = field(default_factory=dict, init=False, repr=False)
    #: (kind, layer) of every edited module, in order.
    pairs: list[tuple[str, int]] = field(default_factory=list, init=False, repr=False)
    #: (requests, statistics updated with them) of the last :meth:`compute_deltas`.
    _pending: tuple[tuple[EditRequest, ...], dict[str, RunningStats]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, int)) or not self.layers:
            raise ConfigError(f"method.layers={self.layers!r} must be a non-empty list of "
                              "layer indices")
        self.layers = [int(x) for x in self.layers]
        if isinstance(self.modules, (Mapping, str)) or not self.modules:
            raise ConfigError(
                f"method.modules={self.modules!r} must be a non-empty list of "
                f"{{kind, layers}} with kind one of {list(EDITABLE_KINDS)}")
        for entry in self.modules:
            entry = dict(entry)
            kind = entry.get("kind")
            if kind not in EDITABLE_KINDS:
                raise ConfigError(f"method.modules kind={kind!r} is not one of "
                                  f"{list(EDITABLE_KINDS)}")
            layers = entry.get("layers", self.layers)
            if isinstance(layers, (str, int)) or not layers:
                raise ConfigError(f"method.modules layers={layers!r} (kind {kind}) must be a "
                                  "non-empty list of layer indices")
            outside = sorted({int(x) for x in layers} - set(self.layers))
            if outside:
                raise ConfigError(f"method.modules layers {outside} (kind {kind}) are not in "
                                  f"method.layers={self.layers}")
            self.pairs += [(str(kind), int(layer)) for layer in layers]
        if len(set(self.pairs)) != len(self.pairs):
            raise ConfigError(f"method.modules lists a module twice: {self.pairs}")
        unused = sorted(set(self.layers) - {layer for _, layer in self.pairs})
        if unused:
            raise ConfigError(f"method.layers {unused} are edited by no entry of "
                              f"method.modules={list(self.modules)}")
        if self.token not in TOKENS:
            raise ConfigError(f"method.token={self.token!r} is not one of {list(TOKENS)}")
        if not float(self.lr) > 0:
            raise ConfigError(f"method.lr={self.lr!r} must be > 0")
        if not float(self.ridge) > 0:
            raise ConfigError(f"method.ridge={self.ridge!r} must be > 0")
        if int(self.sub_batch) < 1:
            raise ConfigError(f"method.sub_batch={self.sub_batch!r} must be >= 1")
        self.lr, self.ridge, self.sub_batch = float(self.lr), float(self.ridge), int(self.sub_batch)

    def targets(self, lm: LoadedModel) -> list[_Target]:
        """The edited modules of ``lm``, in config order."""
        out = []
        for kind, layer in self.pairs:
            if not getattr(lm.spec, kind):
                have = [k for k in EDITABLE_KINDS if getattr(lm.spec, k)]
                raise ConfigError(f"method.modules kind={kind!r}: model {lm.spec.name!r} "
                                  f"has no model.modules.{kind}; it has {have}")
            name = lm.spec.weight(kind, layer)
            w = lm.spec.as_linear(kind, lm.model.get_parameter(name))  # [d_out, d_in]
            out.append(_Target(kind, layer, lm.spec.module(kind, layer), name,
                               (int(w.shape[1]), int(w.shape[0]))))
        return out

    # -- state ------------------------------------------------------------------------
    def prepare(self, ctx: EditContext) -> None:
        self.targets(ctx.lm)  # a kind the model lacks fails here, while building

    def commit(self, ctx: EditContext, requests: Sequence[EditRequest], applied: Deltas) -> None:
        """Adopt the statistics :meth:`compute_deltas` updated with these requests."""
        if self._pending is None or self._pending[0] != tuple(requests):
            raise RuntimeError("UltraEdit.commit: compute_deltas was not called for these "
                               "requests (the statistics are those of the unedited step)")
        self.stats, self._pending = self._pending[1], None

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (safetensors-ready): ``stats.{d_in}x{d_out}.{n,mean,m2}``."""
        state: dict[str, Any] = {}
        for key, s in self.stats.items():
            for part in ("n", "mean", "m2"):
                state[f"stats.{key}.{part}"] = getattr(s, part).detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {k.split(".")[1] for k in state if k.startswith("stats.")}
        self.stats = {key: RunningStats(*(state[f"stats.{key}.{p}"].double().clone()
                                          for p in ("n", "mean", "m2")))
                      for key in sorted(keys)}
        self._pending = None

    # -- edit -------------------------------------------------------------------------
    def sub_batches(self, lm: LoadedModel, requests: Sequence[EditRequest]
                    ) -> list[TeacherForced]:
        """The step's requests, longest row first (stable; the reference's ``collate_fn``
        sorts by ``attention_mask.sum()``, ``data/base.py:43-58``), in groups of
        ``sub_batch``, each teacher-forced on its new object as evaluation tokenises it."""
        tok = lm.tokenizer
        pairs = [(prompt_ids(tok, r.rewrite_prompt), target_ids(tok, r.target_new))
                 for r in requests]
        order = sorted(range(len(pairs)), key=lambda i: -len(TeacherForced.row_ids(*pairs[i])))
        return [TeacherForced.from_ids([pairs[i] for i in order[s:s + self.sub_batch]],
                                       tok.pad_token_id, lm.device)
                for s in range(0, len(order), self.sub_batch)]

    def keys_and_grads(self, lm: LoadedModel, batch: TeacherForced, targets: Sequence[_Target]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (K [N, d_in], G [N, d_out])}`` of one sub-batch (float32), rows in
        row-major order of the positions (the reference's ``torch.where``). The loss is
        the mean NLL over the sub-batch's answer tokens (``util.py:44-56``)."""
        leaves: dict[str, torch.Tensor] = {}

        def add_leaf(module: str):
            def fn(h: torch.Tensor) -> torch.Tensor:  # h + 0, with 0 a leaf: ∂loss/∂h
                leaves[module] = torch.zeros_like(h, requires_grad=True)
                return h + leaves[module]

            return fn

        modules = [t.module for t in targets]
        with torch.enable_grad(), edit_outputs(lm.model, {m: add_leaf(m) for m in modules}):
            hidden, tr = batch.hidden(lm, capture=modules)
            loss = batch.token_nll(batch.logp(lm, hidden)).mean()
            grads = torch.autograd.grad(loss, [leaves[m] for m in modules])
        if self.token == "ans":
            rows, cols = batch.row, batch.col  # the columns predicting answer tokens
        else:
            rows, cols = batch.mask.bool().nonzero(as_tuple=True)  # every real token
        return {m: (tr[m].input[rows, cols].detach().float(), g[rows, cols].float())
                for m, g in zip(modules, grads, strict=True)}

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        targets = self.targets(lm)
        with ctx.clock("keys"):  # one forward/backward per sub-batch
            parts = [self.keys_and_grads(lm, b, targets) for b in self.sub_batches(lm, requests)]
        stats = dict(self.stats)
        for part in parts:  # as ``cache``: each sub-batch, then each module, updates its shape
            for t in targets:
                k, g = part[t.module]
                prev = stats.get(t.stats_key) or RunningStats.empty(sum(t.shape), k.device)
                stats[t.stats_key] = normalizer_update(prev.to(k.device), torch.cat([k, g], 1))
        deltas: Deltas = {}
        with ctx.clock("solve"):
            for t in targets:
                K = torch.cat([p[t.module][0] for p in parts])  # [N, d_in]
                G = torch.cat([p[t.module][1] for p in parts])  # [N, d_out]
                delta = ultraedit_update(K, G, stats[t.stats_key], self.lr, self.ridge)
                deltas[t.weight] = lm.spec.to_param(t.kind, delta.float())
        self._pending = (tuple(requests), stats)
        return deltas
