"""Second-moment statistics C = E[k kᵀ] of the keys entering an edited projection.

Owned by a run (no module-level cache) and cached on disk, keyed by every input that
changes the result: model weights fingerprint, module path, corpus content, token count,
sequence length and dtype. Up to ``layers_per_pass`` requested layers (default: all) are
computed in one pass over the corpus, and the forward pass stops after the deepest of them
(the rest of the model never runs); each layer is saved, and its float64 sum freed, before
the next pass. Each layer's C is served on the device of that layer's weights (a model
sharded with ``device_map=auto`` keeps its layers on different GPUs).

The corpus is streamed, never held as one string: it is read as lines (universal
newlines; every line ends with ``"\n"``; an ``hf:`` dataset's rows are split into lines the
same way), each line is tokenised on its own, and the token ids of all lines, in order,
form one stream. Lines are handed to the tokenizer in chunks of about ``chunk_chars``
characters (a line is never split), so the chunk size changes only speed and memory,
never a token: any chunking gives the same stream, hence the same windows and the same
statistics. Two passes over the stream: the first counts its tokens, the second keeps
only the ``seq_len``-token windows spread evenly over it (those windows are all that is
held in memory).

``import_from`` takes C from second-moment files that ROME, MEMIT or EasyEdit computed
(``{module}_float32_mom2_N.npz``: Σ kkᵀ and the count, :func:`read_mom2`) instead of
computing it; each layer's file is checked against that layer's key dimension and cached
like a computed one, keyed by the file's bytes instead of the corpus and sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kaedit.errors import ConfigError
from kaedit.hooks import run_until
from kaedit.models import LoadedModel, file_sha256
from kaedit.tokens import chunks

log = logging.getLogger(__name__)


class CorpusError(ConfigError):
    """The text corpus for statistics cannot be read."""


class CovarianceStore:
    """Compute, cache and serve E[kkᵀ] for ``module_kind`` inputs at given layers.

    ``corpus`` is a list of local text files (read in order) or an ``hf:NAME/CONFIG:SPLIT``
    dataset id (needs internet). ``n_tokens`` tokens are taken as ``seq_len``-token windows
    spread evenly over the corpus; ``None``: every whole window of the corpus. The keys'
    second moments are summed batch by batch, so memory does not grow with the corpus.
    """

    def __init__(
        self,
        corpus: Sequence[str] | str,
        cache_dir: str,
        n_tokens: int | None = 40_000,
        seq_len: int = 128,
        batch_size: int = 16,
        module_kind: str = "mlp_out",
        layers_per_pass: int | None = None,
        chunk_chars: int = 1 << 20,
        import_from: str | None = None,
    ) -> None:
        if layers_per_pass is not None and int(layers_per_pass) < 1:
            raise ValueError(f"stats.layers_per_pass={layers_per_pass} must be >= 1 or null")
        if int(chunk_chars) < 1:
            raise ValueError(f"stats.chunk_chars={chunk_chars} must be >= 1")
        self.corpus = [corpus] if isinstance(corpus, str) else [str(c) for c in corpus]
        self.cache_dir = Path(cache_dir).expanduser()
        if n_tokens is not None and int(n_tokens) < 1:
            raise ConfigError(f"stats.n_tokens={n_tokens} must be >= 1, or null (the whole corpus)")
        self.n_tokens = None if n_tokens is None else int(n_tokens)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.module_kind = module_kind
        self.layers_per_pass = None if layers_per_pass is None else int(layers_per_pass)
        #: Characters of whole lines tokenised per call (memory/speed only; module doc).
        self.chunk_chars = int(chunk_chars)
        #: ROME/MEMIT/EasyEdit ``*_mom2_*.npz`` files (a file or a folder searched
        #: recursively) to take C from instead of computing it (:func:`read_mom2`).
        self.import_from = None if import_from in (None, "") else str(import_from)
        self._memory: dict[str, torch.Tensor] = {}
        self._corpus_id: str | None = None
        #: Seconds spent computing (not loading) statistics in this run (benchmarks read it).
        self.compute_seconds = 0.0

    # -- corpus -----------------------------------------------------------------------
    def corpus_id(self) -> str:
        if self._corpus_id is None:
            h = hashlib.sha256()
            for src in self.corpus:
                path = Path(src).expanduser()
                if src.startswith("hf:") or not path.is_file():
                    h.update(src.encode())
                    continue
                with path.open("rb") as f:  # in blocks: the corpus may be large
                    while block := f.read(1 << 20):
                        h.update(block)
            self._corpus_id = h.hexdigest()[:16]
        return self._corpus_id

    def _token_chunks(self, tok) -> Iterator[list[int]]:
        """The corpus's token stream, one chunk of whole lines at a time (module doc)."""
        for lines in corpus_chunks(self.corpus, self.chunk_chars, "stats.corpus"):
            for ids in tok(lines, add_special_tokens=False)["input_ids"]:
                yield list(ids)

    def _windows(self, tok) -> torch.Tensor:
        """``[n_win, seq_len]``: ``n_tokens // seq_len`` windows spread evenly over the
        stream's ``total // seq_len`` consecutive windows (at most all of them; all of them
        when ``n_tokens`` is None)."""
        total = sum(len(ids) for ids in self._token_chunks(tok))  # pass 1: count
        n_win_total = total // self.seq_len
        if n_win_total == 0:
            raise CorpusError(f"statistics corpus has fewer than seq_len={self.seq_len} tokens")
        wanted = n_win_total if self.n_tokens is None else max(1, self.n_tokens // self.seq_len)
        n_win = min(wanted, n_win_total)
        starts = (torch.linspace(0, n_win_total - 1, n_win).round().long()
                  * self.seq_len).tolist()
        out: list[list[int]] = []
        buf: list[int] = []  # the stream from token `buf_start` on
        buf_start = 0
        for ids in self._token_chunks(tok):  # pass 2: keep the chosen windows
            buf.extend(ids)
            buf_end = buf_start + len(buf)
            while len(out) < len(starts) and starts[len(out)] + self.seq_len <= buf_end:
                s = starts[len(out)] - buf_start
                out.append(buf[s : s + self.seq_len])
            if len(out) == len(starts):
                break
            keep_from = min(starts[len(out)], buf_end) - buf_start
            buf, buf_start = buf[keep_from:], buf_start + keep_from
        return torch.tensor(out, dtype=torch.long)

    # -- cache --------------------------------------------------------------------------
    def key(self, lm: LoadedModel, module: str) -> str:
        dtype = str(next(lm.model.parameters()).dtype)
        if self.import_from is not None:  # the imported file's bytes replace corpus and sizes
            source = ["import", file_sha256(mom2_file(self.import_from, module), 32)]
        else:  # statistics of the whole-string tokenisation differed: marked
            source = [self.corpus_id(), self.n_tokens, self.seq_len, "tokenised-by-line"]
        parts = [lm.fingerprint, module, *source, dtype]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def get(self, lm: LoadedModel, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{layer: C}`` with C float32 ``[d_in, d_in]`` on the device of that layer's
        ``module_kind`` weight."""
        modules = {layer: lm.spec.module(self.module_kind, layer) for layer in layers}
        keys = {layer: self.key(lm, m) for layer, m in modules.items()}
        for k in keys.values():
            if k not in self._memory and self._path(k).is_file():
                self._memory[k] = load_file(self._path(k))["second_moment"]
        todo = [layer for layer, k in keys.items() if k not in self._memory]
        if self.import_from is not None:
            for layer in todo:
                path = mom2_file(self.import_from, modules[layer])
                c, count = read_mom2(path, _input_dim(lm, self.module_kind, layer))
                log.info("imported E[kk^T] of %s from %s (%d samples)", modules[layer], path,
                         count)
                self._save(keys[layer], modules[layer], c, count, lm, source=f"import:{path}")
                self._memory[keys[layer]] = c
            todo = []
        step = self.layers_per_pass or max(1, len(todo))
        for i in range(0, len(todo), step):
            import time

            t0 = time.perf_counter()
            computed = self._compute(lm, {layer: modules[layer] for layer in todo[i : i + step]})
            self.compute_seconds += time.perf_counter() - t0
            for layer, (c, count) in computed.items():
                self._save(keys[layer], modules[layer], c, count, lm)
                self._memory[keys[layer]] = c.cpu()
            del computed
        return {layer: self._memory[keys[layer]].to(_weight_device(lm, modules[layer]))
                for layer in layers}

    def _save(self, key: str, module: str, c: torch.Tensor, count: int, lm: LoadedModel,
              source: str | None = None) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"module": module, "model": lm.fingerprint,
                "corpus": source or ",".join(self.corpus),
                "n_tokens": str(count), "seq_len": str(self.seq_len)}
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"second_moment": c.contiguous().cpu()}, tmp, metadata=meta)
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @torch.inference_mode()
    def _compute(self, lm: LoadedModel, modules: dict[int, str]) -> dict[int, tuple]:
        windows = self._windows(lm.tokenizer)
        log.info("computing key statistics for layers %s over %d tokens",
                 sorted(modules), windows.numel())
        sums: dict[int, torch.Tensor] = {}
        count = 0
        for sl in tqdm(list(chunks(len(windows), self.batch_size)), desc="key statistics",
                       leave=False, disable=None):
            ids = windows[sl].to(lm.device)
            tr = run_until(lm.model, modules.values(), inputs=True, outputs=False,
                           input_ids=ids, use_cache=False)
            for layer, m in modules.items():
                k = tr[m].input.reshape(-1, tr[m].input.shape[-1]).double()  # [tokens, d_in]
                sums[layer] = sums.get(layer, 0) + k.T @ k
            count += ids.numel()
        return {layer: ((s / count).float(), count) for layer, s in sums.items()}


# ----------------------------------------------------------------------------- import
#: Keys of a ROME ``layer_stats`` file (kmeng01/rome ``util/runningstats.py``: a
#: ``CombinedStat(mom2=SecondMoment())`` state dict saved with ``numpy.savez``): the summed
#: second moment Σ k kᵀ and the number of keys summed. MEMIT and EasyEdit use the same code.
MOM2_SUM, MOM2_COUNT = "mom2.mom2", "mom2.count"


def mom2_file(source: str | Path, module: str) -> Path:
    """The ``*.npz`` for ``module`` in ``source``: ROME names each file after the module,
    ``{module}_{precision}_mom2[_{samples}].npz`` (e.g.
    ``gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz``). A
    folder is searched recursively; a file must be the one for ``module``."""
    src = Path(str(source)).expanduser()
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = sorted(src.rglob("*.npz"))
    else:
        raise ConfigError(f"stats.import_from={str(source)!r} is neither a file nor a folder")
    found = [f for f in files if f.name.startswith(f"{module}_") and "mom2" in f.name]
    if len(found) != 1:
        names = [f.name for f in files][:6]
        raise ConfigError(
            f"stats.import_from={str(source)!r}: {'no' if not found else len(found)} "
            f"'{module}_*mom2*.npz' file{'s' if found else ''} for module {module!r} "
            f"(found {names}{' ...' if len(files) > 6 else ''}); ROME names a layer's file "
            f"'{module}_float32_mom2_100000.npz'"
        )
    return found[0]


def read_mom2(path: str | Path, d_in: int) -> tuple[torch.Tensor, int]:
    """(C = Σ k kᵀ / count as float32 ``[d_in, d_in]``, count) from a ROME mom2 file; a
    file of another shape, or without ROME's keys, is a :class:`ConfigError`."""
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as z:
            missing = [k for k in (MOM2_SUM, MOM2_COUNT) if k not in z.files]
            if missing:
                raise ConfigError(f"{str(path)!r} lacks {missing} (has {sorted(z.files)}): "
                                  "not a ROME/MEMIT layer_stats mom2 file")
            total, count = z[MOM2_SUM], int(z[MOM2_COUNT])
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{str(path)!r} is not a readable .npz file ({exc})") from None
    if total.shape != (d_in, d_in):
        raise ConfigError(f"{str(path)!r} holds a {list(total.shape)} second moment; the "
                          f"edited module takes {d_in}-dim keys, so it must be "
                          f"[{d_in}, {d_in}] (a file of another model or layer kind?)")
    if count <= 0:
        raise ConfigError(f"{str(path)!r}: sample count {count} must be positive")
    c = torch.from_numpy(np.asarray(total, dtype=np.float64)) / count  # [d_in, d_in]
    return c.float(), count


def _input_dim(lm: LoadedModel, kind: str, layer: int) -> int:
    """d_in of ``kind``'s weight at ``layer`` (``nn.Linear`` orientation)."""
    weight = lm.model.get_parameter(lm.spec.weight(kind, layer))
    return int(lm.spec.as_linear(kind, weight).shape[1])


def _weight_device(lm: LoadedModel, module: str) -> torch.device:
    """Where ``module``'s weight lives (its layer's GPU when the model is sharded)."""
    weight = getattr(lm.model.get_submodule(module), "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else lm.device


def corpus_lines(sources: Sequence[str], key: str = "stats.corpus") -> Iterator[str]:
    """The lines of local files and ``hf:NAME/CONFIG:SPLIT`` datasets, in order, streamed;
    every line ends with ``"\\n"`` (``"\\r\\n"`` read as ``"\\n"``)."""
    any_text = False
    for src in sources:
        if src.startswith("hf:"):
            texts: Iterator[str] = _hf_rows(src[3:])
        else:
            path = Path(src).expanduser()
            if not path.is_file():
                raise CorpusError(
                    f"{key} file {src!r} does not exist; set {key} to "
                    "text files or 'hf:wikitext/wikitext-103-raw-v1:train'"
                )
            texts = _file_lines(path)
        for text in texts:
            *full, last = text.replace("\r\n", "\n").split("\n")
            for line in [*full, last] if last or not full else full:  # "" -> one empty line
                any_text = any_text or bool(line.strip())
                yield line + "\n"
    if not any_text:
        raise CorpusError(f"{key} {list(sources)} is empty")


def _file_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace", newline=None) as f:
        yield from f


def corpus_chunks(sources: Sequence[str], chunk_chars: int,
                  key: str = "stats.corpus") -> Iterator[list[str]]:
    """:func:`corpus_lines` grouped into lists of about ``chunk_chars`` characters (whole
    lines; a longer line is a chunk of its own)."""
    buf: list[str] = []
    size = 0
    for line in corpus_lines(sources, key):
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def read_corpus(sources: Sequence[str], key: str = "stats.corpus") -> str:
    """The text of local files and ``hf:NAME/CONFIG:SPLIT`` datasets, joined in order."""
    texts = []
    for src in sources:
        if src.startswith("hf:"):
            texts.append("\n".join(_hf_rows(src[3:])))
            continue
        path = Path(src).expanduser()
        if not path.is_file():
            raise CorpusError(
                f"{key} file {src!r} does not exist; set {key} to "
                "text files or 'hf:wikitext/wikitext-103-raw-v1:train'"
            )
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(t.replace("\r\n", "\n") for t in texts)
    if not text.strip():
        raise CorpusError(f"{key} {list(sources)} is empty")
    return text


def _hf_rows(spec: str) -> Iterator[str]:
    """``NAME/CONFIG:SPLIT`` (e.g. ``wikitext/wikitext-103-raw-v1:train``) -> its text rows."""
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    path, _, config = name.partition("/")
    try:
        ds = load_dataset(path, config or None, split=split or "train")
    except Exception as exc:  # hub, network and config errors all end here
        raise CorpusError(f"could not load statistics corpus 'hf:{spec}': {exc}") from None
    for row in ds:
        yield row["text"]
