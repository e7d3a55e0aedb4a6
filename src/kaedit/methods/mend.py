"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"): a trained editor network
turns the fine-tuning gradient of an edit into a weight change.

**Gradient decomposition.** For a linear layer W ``[d_out, d_in]`` and a loss over a
batch of token positions t, ∇_W L = Σ_t δ_t u_tᵀ, where u_t is the layer's input at t and
δ_t = ∂L/∂(W u_t) the gradient of its output. MEND never forms ∇_W L: it transforms the
pair (u_t, δ_t) of every token.

**Editor.** Each pair is normalised per dimension with statistics estimated on training
edits, z = [(u − μ_u)/σ_u ; (δ − μ_δ)/σ_δ] ``[d_in + d_out]``, and passed through an MLP
of ``n_blocks`` residual, low-rank blocks whose weights are shared by every edited
weight of the same shape, with a scale s and shift o of its own per edited weight::

    z ← z + s_l,k ⊙ (U_k relu(V_k z + b_k)) + o_l,k          k = 1..n_blocks

U_k (``[D, rank]``) starts at zero and s at one, o at zero, so the initial editor is the
identity (the update is then the normalised gradient step). The paper puts the
nonlinearity after the low-rank product, σ(s ⊙ (U V z + b) + o); with U = 0 that ReLU
sits at 0, where autograd's derivative is 0, and the editor could never leave the
identity, so here it sits between V and U. The output splits into (ũ, δ̃) and the edit of
weight l is

    Δ_l = −α_l Σ_t δ̃_t ũ_tᵀ       (α_l = exp(log_lr_l), a learned step size per weight)

**Edit loss.** The gradient is that of Σ_requests (token-mean NLL of the new object given
the rewrite prompt), teacher-forced like FT-L; every real token of the batch contributes
one rank-1 term. A batch of requests is one gradient, hence one edit (MEND's batched
editing). Training (:mod:`kaedit.train_mend`) fits the editor's parameters; this module
holds the editor, the gradient factors, the checkpoint format and the
:class:`~kaedit.methods.base.EditMethod`.

The editor produces every layer's Δ at once, with no layer loop: ``EditContext.layer_fusion``
is not used, and ``fusion.scope=layer`` fuses each returned Δ once after the method, as
``step`` does (each weight with its own generator, :func:`kaedit.fusion.layer_generator`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kaedit.errors import ConfigError
from kaedit.hooks import TraceResult
from kaedit.methods.base import EditContext, Stateless
from kaedit.models import LoadedModel, file_sha256
from kaedit.records import Deltas, EditRequest
from kaedit.tokens import TeacherForced
from kaedit.weights import parameters

log = logging.getLogger(__name__)

#: Module kinds (``model.modules``) whose weight MEND may edit.
EDITABLE_KINDS = ("mlp_in", "mlp_out", "attn_out")
#: Bumped when the checkpoint layout changes; older files are refused with a clear error.
FORMAT = "kaedit-mend-1"


# ------------------------------------------------------------------ which weights to edit
def edited_weights(lm: LoadedModel, layers: Sequence[int], kinds: Sequence[str]) -> list[str]:
    """Parameter names of the ``kinds`` weights at ``layers`` (negative: from the end).

    MEND edits the last layers' MLP matrices: ``layers=[-3, -2, -1]`` with
    ``kinds=["mlp_in", "mlp_out"]`` is the up- and down-projection of the last three.
    """
    n = lm.spec.n_layers
    bad = [k for k in kinds if k not in EDITABLE_KINDS]
    if bad or not kinds:
        raise ConfigError(
            f"editor.kinds={list(kinds)} must be a non-empty list of {list(EDITABLE_KINDS)}"
        )
    out_of_range = [x for x in layers if not -n <= int(x) < n]
    if out_of_range or not layers:
        raise ConfigError(
            f"editor.layers={list(layers)}: {lm.spec.name!r} has {n} layers; "
            f"use indices in {-n}..{n - 1} (negative counts from the end)"
        )
    resolved = sorted({int(x) % n for x in layers})
    names = [lm.spec.weight(kind, layer) for layer in resolved for kind in kinds]
    parameters(lm.model, names)  # KeyError naming the path if a template is wrong
    return names


# ------------------------------------------------------------------------ the token rows
#: MEND's batches are the shared teacher-forced batch: the edit pairs, then plain
#: locality prompts (``Rows.build(lm, [(prompt, target), ...], plain=[...])``).
Rows = TeacherForced


def forward(
    lm: LoadedModel,
    rows: TeacherForced,
    weights: Mapping[str, torch.Tensor] | None = None,
    capture: Iterable[str] = (),
) -> tuple[torch.Tensor, TraceResult]:
    """Final hidden states ``[n, len, d]`` with ``weights`` substituted and ``capture``d
    modules recorded (:meth:`kaedit.tokens.TeacherForced.hidden`)."""
    return rows.hidden(lm, weights, capture)


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def gradient_factors(
    lm: LoadedModel, names: Sequence[str], rows: TeacherForced
) -> tuple[Factors, torch.Tensor]:
    """MEND's rank-1 decomposition of ∇_W Σ_rows NLL for each named weight.

    Returns ``{name: (u [T, d_in], δ [T, d_out])}`` over the T real tokens of the forced
    rows (float32, detached), so that ∇_W = δᵀ u, and the detached final hidden states
    of the same forward pass (the plain rows' unedited outputs come with it for free).
    """
    params = parameters(lm.model, names)
    modules = {n: n.removesuffix(".weight") for n in names}
    # Leaves sharing the weights' storage: gradients reach the module outputs, and the
    # backward pass stops at the first edited layer.
    weights = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        hidden, tr = forward(lm, rows, weights, modules.values())
        loss = rows.forced_nll(lm, hidden).sum()
        outs = [tr[modules[n]].output for n in names]
        grads = torch.autograd.grad(loss, outs)
    sel = rows.mask[: rows.n_forced].bool()  # [n_forced, len]: real tokens
    factors = {}
    for n, g in zip(names, grads, strict=True):
        u = tr[modules[n]].input[: rows.n_forced][sel]  # [T, d_in]
        factors[n] = (u.detach().float(), g[: rows.n_forced][sel].detach().float())
    return factors, hidden.detach()


def edit_factors(lm: LoadedModel, names: Sequence[str],
                 requests: Sequence[EditRequest]) -> Factors:
    """The gradient factors of one edit: Σ NLL(new object | rewrite prompt) over
    ``requests`` (MEND's batched edit; the editor turns them into the weight deltas)."""
    rows = TeacherForced.build(lm, [(r.rewrite_prompt, r.target_new) for r in requests])
    return gradient_factors(lm, names, rows)[0]


# ------------------------------------------------------------------------------ editor
@dataclass(frozen=True)
class EditorSpec:
    """What an editor edits and its size: saved with (and checked against) a checkpoint."""

    #: Edited parameter names, in order, and their shapes ``(d_out, d_in)``.
    weights: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    rank: int = 128
    n_blocks: int = 2
    #: Initial step size α (learned per weight afterwards).
    init_lr: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(str(w) for w in self.weights))
        object.__setattr__(self, "shapes", tuple((int(a), int(b)) for a, b in self.shapes))
        if len(self.weights) != len(self.shapes) or not self.weights:
            raise ConfigError(
                f"editor: {len(self.weights)} weights but {len(self.shapes)} "
                "shapes; each edited weight needs its shape"
            )
        if int(self.rank) < 1 or int(self.n_blocks) < 0:
            raise ConfigError(
                f"editor.rank={self.rank} must be >= 1 and editor.n_blocks={self.n_blocks} >= 0"
            )
        if not (math.isfinite(float(self.init_lr)) and float(self.init_lr) > 0):
            raise ConfigError(f"editor.init_lr={self.init_lr} must be a positive number")

    @classmethod
    def for_model(cls, lm: LoadedModel, names: Sequence[str], **kwargs: Any) -> EditorSpec:
        params = parameters(lm.model, names)
        return cls(tuple(names), tuple(tuple(params[n].shape) for n in names), **kwargs)

    def groups(self) -> dict[tuple[int, int], list[str]]:
        """Weights by shape, in order: one shared network per shape."""
        out: dict[tuple[int, int], list[str]] = {}
        for name, shape in zip(self.weights, self.shapes, strict=True):
            out.setdefault(shape, []).append(name)
        return out


class _ShapeNet(nn.Module):
    """The editor network of one weight shape, with each weight's scale/shift and
    normalisation statistics (row i = the i-th weight of this shape)."""

    def __init__(
        self,
        d_out: int,
        d_in: int,
        n_weights: int,
        rank: int,
        n_blocks: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.down = nn.Parameter(
            torch.randn(n_blocks, dim, rank, generator=generator) / math.sqrt(dim)
        )  # V_k [dim, rank]
        self.bias = nn.Parameter(torch.zeros(n_blocks, rank))
        self.up = nn.Parameter(torch.zeros(n_blocks, rank, dim))  # U_k = 0: identity
        self.scale = nn.Parameter(torch.ones(n_weights, n_blocks, dim))
        self.shift = nn.Parameter(torch.zeros(n_weights, n_blocks, dim))
        self.register_buffer("u_mean", torch.zeros(n_weights, d_in))
        self.register_buffer("u_std", torch.ones(n_weights, d_in))
        self.register_buffer("d_mean", torch.zeros(n_weights, d_out))
        self.register_buffer("d_std", torch.ones(n_weights, d_out))

    def forward(
        self, i: int, u: torch.Tensor, d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ ``[T, d_in]``, δ̃ ``[T, d_out]``) for weight i's factors."""
        z = torch.cat(
            [(u - self.u_mean[i]) / self.u_std[i], (d - self.d_mean[i]) / self.d_std[i]], dim=-1
        )  # [T, dim]
        for k in range(self.down.shape[0]):
            branch = torch.relu(z @ self.down[k] + self.bias[k]) @ self.up[k]  # [T, dim]
            z = z + self.scale[i, k] * branch + self.shift[i, k]
        return z[:, : self.d_in], z[:, self.d_in :]


class MendEditor(nn.Module):
    """All editor networks of one model: factors in, weight deltas out."""

    def __init__(self, spec: EditorSpec, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(int(seed))
        self.index: dict[str, tuple[str, int]] = {}  # weight -> (network key, row)
        nets = {}
        for (d_out, d_in), names in spec.groups().items():
            key = f"{d_out}x{d_in}"
            nets[key] = _ShapeNet(d_out, d_in, len(names), int(spec.rank), int(spec.n_blocks), gen)
            self.index.update({n: (key, i) for i, n in enumerate(names)})
        self.nets = nn.ModuleDict(nets)
        self.log_lr = nn.Parameter(torch.full((len(spec.weights),), math.log(spec.init_lr)))

    def lr(self, name: str) -> torch.Tensor:
        return self.log_lr[self.spec.weights.index(name)].exp()

    def transform(
        self, name: str, u: torch.Tensor, d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key, i = self.index[name]
        return self.nets[key](i, u, d)

    def deltas(self, factors: Factors) -> Deltas:
        """Δ_l = −α_l Σ_t δ̃_t ũ_tᵀ ``[d_out, d_in]`` per weight (differentiable)."""
        out = {}
        for name in self.spec.weights:
            u, d = factors[name]
            u_t, d_t = self.transform(name, u, d)
            out[name] = -self.lr(name) * (d_t.T @ u_t)  # [d_out, T] @ [T, d_in]
        return out

    @torch.no_grad()
    def set_normalisation(self, factors: Iterable[Factors]) -> int:
        """Per-weight, per-dimension mean and standard deviation of u and δ over all the
        tokens of ``factors`` (float64 sums). Returns the number of tokens used."""
        sums: dict[str, list[torch.Tensor]] = {}
        count = 0
        for batch in factors:
            for name in self.spec.weights:
                u, d = (x.double() for x in batch[name])
                acc = [u.sum(0), (u * u).sum(0), d.sum(0), (d * d).sum(0)]
                if name in sums:
                    acc = [a + b for a, b in zip(sums[name], acc, strict=True)]
                sums[name] = acc
            count += len(batch[self.spec.weights[0]][0])
        if count < 2:
            raise ValueError(f"normalisation statistics need at least 2 tokens, got {count}")
        for name, (su, su2, sd, sd2) in sums.items():
            key, i = self.index[name]
            net = self.nets[key]
            for mean_buf, std_buf, s, s2 in (
                (net.u_mean, net.u_std, su, su2),
                (net.d_mean, net.d_std, sd, sd2),
            ):
                mean = s / count
                std = (s2 / count - mean * mean).clamp_min(0).sqrt()
                # Dimensions that never vary would divide by ~0: floor at 1e-6 of the mean std.
                std = std.clamp_min(1e-6 * float(std.mean()) + 1e-12)
                mean_buf[i] = mean.float()
                std_buf[i] = std.float()
        return count


# --------------------------------------------------------------------------- checkpoint
def sidecar(path: str | Path) -> Path:
    """The JSON file describing a checkpoint: ``editor.safetensors`` → ``editor.json``."""
    return Path(path).with_suffix(".json")


def save_editor(
    editor: MendEditor, path: str | Path, lm: LoadedModel, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``path`` (safetensors: the editor's tensors) and its JSON sidecar (format,
    model name and fingerprint, edited weights and shapes, editor size, tensors' sha256,
    ``extra``: training settings and summary). Both are written atomically."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"output={str(path)!r}: a MEND checkpoint path must end in "
            ".safetensors (its JSON description goes beside it)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in editor.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        digest = file_sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "format": FORMAT,
        "model": {"name": lm.spec.name, "fingerprint": lm.fingerprint},
        "editor": asdict(editor.spec),
        "sha256": digest,
        **dict(extra or {}),
    }
    side = sidecar(path)
    tmp_side = side.with_name(f".tmp-{side.name}")
    tmp_side.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.replace(tmp_side, side)
    return path


def load_editor(
    path: str | Path | None, lm: LoadedModel, key: str = "method.checkpoint"
) -> tuple[MendEditor, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_editor` and check it belongs to ``lm``.

    Every problem (missing file or sidecar, damaged file, another model, a weight the model
    lacks or of another shape) is one :class:`ConfigError` naming ``key`` and the path.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    train_hint = f"train one with `python -m kaedit.train_mend model={lm.spec.name}`"
    if path in (None, "", "null"):
        raise ConfigError(
            f"{key} is not set: MEND needs a trained editor; {train_hint} and pass {key}=PATH"
        )
    p = Path(str(path)).expanduser()
    where = f"{key}={str(p)!r}"
    if not p.is_file():
        raise ConfigError(
            f"{where} does not exist; {train_hint} (it writes "
            f"output=PATH, default ~/.cache/kaedit/mend/{lm.spec.name}.safetensors)"
        )
    side = sidecar(p)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: its description {str(side)!r} is missing (a MEND "
            "checkpoint is the .safetensors file and the .json beside it)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: {str(side)!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(
            f"{where}: format {got!r} is not {FORMAT!r}; retrain it with "
            "`python -m kaedit.train_mend`"
        )
    if file_sha256(p) != meta.get("sha256"):
        raise ConfigError(
            f"{where}: the tensors do not match the sha256 recorded in "
            f"{str(side)!r} (a file was replaced or damaged); retrain or restore it"
        )
    model = meta.get("model", {})
    if model.get("fingerprint") != lm.fingerprint:
        raise ConfigError(
            f"{where} was trained for model {model.get('name')!r} "
            f"({model.get('fingerprint')}), not for the loaded {lm.spec.name!r} "
            f"({lm.fingerprint}); {train_hint}"
        )
    try:
        spec = EditorSpec(**meta["editor"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid editor description in {str(side)!r} ({exc})") from None
    params = dict(lm.model.named_parameters())
    for name, shape in zip(spec.weights, spec.shapes, strict=True):
        if name not in params or tuple(params[name].shape) != shape:
            have = tuple(params[name].shape) if name in params else "no such parameter"
            raise ConfigError(
                f"{where} edits {name} of shape {shape}, but the loaded model "
                f"has {have}; {train_hint}"
            )
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{where} is not a readable safetensors file ({exc})") from None
    editor = MendEditor(spec)
    try:
        editor.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: tensors do not fit the editor described ({first})") from None
    return editor.to(lm.device), meta


# ------------------------------------------------------------------------------ method
@dataclass
class MEND(Stateless):
    """The trained editor applied to each batch: one gradient, one transformed update.

    ``checkpoint`` is read in :meth:`prepare` (file written by ``python -m
    kaedit.train_mend``); it fixes which weights are edited.
    """

    checkpoint: str | None = None
    editor: MendEditor | None = field(default=None, init=False, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    #: case_ids the editor was trained on (a request among them is not held out).
    trained_on: set[str] = field(default_factory=set, init=False, repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        """None declared (``EditMethod.layers``): the checkpoint names the edited weights,
        and :func:`load_editor` checks them against the model."""
        return ()

    def prepare(self, ctx: EditContext) -> None:
        self.editor, self.meta = load_editor(self.checkpoint, ctx.lm)
        self.editor.eval()
        self.trained_on = {str(c) for c in self.meta.get("trained_on_case_ids", [])}
        log.info(
            "MEND editor %s: %d weights (%s)",
            self.checkpoint,
            len(self.editor.spec.weights),
            ", ".join(self.editor.spec.weights),
        )

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        if self.editor is None:
            raise RuntimeError(
                "MEND.prepare(ctx) must run before compute_deltas: it loads the editor checkpoint"
            )
        seen = sorted({r.case_id for r in requests} & self.trained_on)
        if seen:
            log.warning(
                "MEND: %d request(s) of this batch were in the editor's training "
                "records (case_id %s): their scores are not held-out",
                len(seen),
                ", ".join(seen[:5]),
            )
        factors = edit_factors(ctx.lm, self.editor.spec.weights, requests)
        with torch.no_grad():
            deltas = self.editor.deltas(factors)
        return {n: d.detach().float() for n, d in deltas.items()}
