"""Find a dataset, read its raw rows and turn them into :class:`EditRequest` records.

A source is a local ``.json``/``.jsonl`` file, an http(s) URL (downloaded once into a cache
directory) or a Hugging Face dataset id ``owner/name``. The schema of a file (ROME CounterFact,
EasyEdit CounterFact, MEND zsRE) is detected from its first row unless forced; the per-schema
row converters live in :mod:`kaedit.data.counterfact` and :mod:`kaedit.data.zsre`; a config
with ``sources`` reads several sources as one stream (:mod:`kaedit.data.merge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from kaedit.data import counterfact, merge, zsre
from kaedit.data.fields import (  # noqa: F401 - re-exported
    DatasetError,
    Row,
    case_id,
    describe,
    template,
    text,
    texts,
)
from kaedit.records import EditRequest

log = logging.getLogger(__name__)

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_DOWNLOAD_TIMEOUT_S = 10.0
_OFFLINE_HINT = "download the file elsewhere and pass dataset.path=/local/file.json"


# ----------------------------------------------------------------------------- schemas
class Schema(NamedTuple):
    """A row layout: the keys that identify it and the function converting one row."""

    keys: tuple[str, ...]
    convert: Callable[[Row, int], EditRequest]


def schemas() -> dict[str, Schema]:
    """The known schemas by name."""
    return {
        "counterfact": Schema(counterfact.ROME_KEYS, counterfact.from_rome),
        "easyedit": Schema(counterfact.EASYEDIT_KEYS, counterfact.from_easyedit),
        # same keys: "auto" picks the first, MEMIT's reading (see kaedit.data.zsre)
        "zsre": Schema(zsre.MEND_KEYS, zsre.from_memit),
        "zsre_easyedit": Schema(zsre.MEND_KEYS, zsre.from_easyedit),
    }


def detect_schema(row: Row) -> list[str]:
    """Names of the schemas whose identifying keys all occur in ``row`` (most specific first)."""
    return [name for name, s in schemas().items() if all(k in row for k in s.keys)]


# ----------------------------------------------------------------------------- sources
def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _is_hf_id(s: str) -> bool:
    return bool(_HF_ID.match(s)) and not s.endswith(_JSON_SUFFIXES) and not os.path.exists(s)


def download(url: str, cache_dir: str) -> str:
    """Fetch ``url`` once into ``cache_dir`` (file named by a hash of the URL, written to a
    temp file then renamed); later calls return the cached copy without touching the network."""
    name = os.path.basename(url.split("?")[0]) or "data.json"
    dest = Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if dest.is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
        ):
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DatasetError(
            f"could not reach dataset source {url} ({err}); {_OFFLINE_HINT}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(dest)


def resolve_source(
    path: str | None,
    candidates: list[str],
    url: str | None,
    hf_id: str | None,
    cache_dir: str,
) -> str:
    """Pick where to read from: a local file path or a Hugging Face dataset id.

    ``path`` wins when given (local file, http(s) URL, or ``owner/name`` hub id); otherwise the
    first existing file among ``candidates``, then ``url`` (downloaded into ``cache_dir``),
    then ``hf_id``.
    """
    if path:
        path = str(path)
        if _is_url(path):
            return download(path, cache_dir)
        if os.path.isfile(path):
            return path
        if _is_hf_id(path):
            return path
        raise DatasetError(
            f"dataset file not found: {path} (expected a .json/.jsonl file, "
            "an http(s) URL or a Hugging Face id owner/name)"
        )
    for cand in candidates or ():
        if cand and os.path.isfile(str(cand)):
            return str(cand)
    if url:
        return download(url, cache_dir)
    if hf_id:
        return hf_id
    raise DatasetError(
        f"no dataset source: none of the candidates {list(candidates or [])} "
        f"exists and no url or hf_id is set; pass dataset.path=/local/file.json"
    )


# ----------------------------------------------------------------------------- raw rows
def read_rows(path: str) -> list[Any]:
    """Raw rows of a ``.json`` file (a list, or a dict holding a "data"/"train"/"test" list)
    or a ``.jsonl`` file (one object per line, blank lines skipped)."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read dataset file {path}: {err}") from None
    if path.endswith((".jsonl", ".ndjson")):
        rows = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(
                    f"{path}: malformed JSON at line {lineno}, column {err.colno}: {err.msg}"
                ) from None
    else:
        if not content.strip():
            raise DatasetError(f"{path} contains no records (the file is empty)")
        try:
            data = json.loads(content)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        if isinstance(data, Mapping):
            key = next(
                (k for k in ("data", "train", "test") if isinstance(data.get(k), list)), None
            )
            if key is None:
                raise DatasetError(
                    f"{path}: expected a JSON list of records or an object with "
                    f"a 'data'/'train'/'test' list, got keys {sorted(data)[:10]}"
                )
            data = data[key]
        if not isinstance(data, list):
            raise DatasetError(
                f"{path}: expected a JSON list of records, got {type(data).__name__}"
            )
        rows = data
    if not rows:
        raise DatasetError(f"{path} contains no records")
    return rows


def read_hub(hf_id: str, split: str, limit: int | None) -> list[Any]:
    """Raw rows of a Hugging Face dataset split (``datasets`` is imported only here)."""
    try:
        import datasets

        ds = datasets.load_dataset(hf_id, split=split)
    except Exception as err:  # hub, network and config errors all end here
        raise DatasetError(
            f"could not load Hugging Face dataset {hf_id!r} split {split!r} "
            f"({type(err).__name__}: {err}); {_OFFLINE_HINT}"
        ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = list(ds)
    if not rows and limit != 0:
        raise DatasetError(f"Hugging Face dataset {hf_id!r} split {split!r} contains no records")
    return rows


def convert_rows(rows: Iterable[Any], schema: str, origin: str) -> list[EditRequest]:
    """Turn raw rows into records with the named schema ("auto" detects it from row 0)."""
    rows = list(rows)
    known = schemas()
    if schema != "auto" and schema not in known:
        raise DatasetError(
            f"unknown dataset schema {schema!r}; valid options: {', '.join(['auto', *known])}"
        )
    if not rows:
        return []
    first = rows[0]
    if not isinstance(first, Mapping):
        raise DatasetError(f"{origin}: record 0 must be a JSON object, got {type(first).__name__}")
    matches = detect_schema(first)
    if schema == "auto":
        if not matches:
            raise DatasetError(
                f"{origin}: cannot detect the schema of record 0 (keys {sorted(first)}); expected "
                + "; ".join(f"{n}: {list(s.keys)}" for n, s in known.items())
            )
        schema = matches[0]
    elif schema not in matches:
        raise DatasetError(
            f"{origin}: schema {schema!r} expects keys {list(known[schema].keys)} but record 0 has "
            f"keys {sorted(first)}" + (f" (it looks like {matches[0]!r})" if matches else "")
        )
    convert = known[schema].convert
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DatasetError(
                f"{origin}: record {i} must be a JSON object, got {type(row).__name__}"
            )
        try:
            out.append(convert(row, i))
        except DatasetError as err:
            raise DatasetError(f"{origin}: {err}") from None
    log.info("loaded %d %s records from %s", len(out), schema, origin)
    return out


def load_requests(
    source: str, schema: str = "auto", limit: int | None = None, *, split: str = "train"
) -> list[EditRequest]:
    """Load edit requests from a local ``.json``/``.jsonl`` file or a Hugging Face dataset id
    (see :func:`resolve_source` for URLs). ``limit`` keeps the first ``limit`` records."""
    check_limit(limit)
    if _is_url(source):
        raise DatasetError(
            f"{source} is a URL: resolve it first with resolve_source(...) "
            "or from_config(...), which download it into a cache directory"
        )
    if os.path.isfile(source):
        rows = read_rows(source)
    elif _is_hf_id(source):
        rows = read_hub(source, split, limit)
    else:
        raise DatasetError(f"dataset file not found: {source}")
    return convert_rows(rows[:limit] if limit is not None else rows, schema, source)


def check_limit(limit: object) -> None:
    """:class:`DatasetError` unless ``limit`` is a non-negative integer or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")


def _load_source(cfg: Mapping[str, Any], cache_dir: str, limit: int | None) -> list[EditRequest]:
    """The requests of one source node (``path``, ``candidates``, ``url``, ``hf_id``,
    ``schema``, ``split``)."""
    source = resolve_source(
        cfg.get("path"),
        [str(c) for c in (cfg.get("candidates") or [])],
        cfg.get("url"),
        cfg.get("hf_id"),
        cache_dir,
    )
    return load_requests(
        source, schema=cfg.get("schema") or "auto", limit=limit, split=cfg.get("split") or "train"
    )


def from_config(cfg: Mapping[str, Any], cache_dir: str) -> list[EditRequest]:
    """Load the requests a ``conf/dataset/*.yaml`` node describes (DictConfig or dict):
    keys ``path``, ``candidates``, ``url``, ``hf_id``, ``schema``, ``split``, ``limit``;
    or ``sources`` (named source nodes with those keys, read in order as one stream by
    :func:`kaedit.data.merge.merge`), ``on_conflict`` and ``limit``."""
    limit = cfg.get("limit")
    limit = None if limit is None else int(limit)
    sources = cfg.get("sources")
    if not sources:
        return _load_source(cfg, cache_dir, limit)
    if cfg.get("path"):
        raise DatasetError(
            "dataset.path is set but this dataset reads dataset.sources: set "
            "dataset.sources.<name>.path instead"
        )
    check_limit(limit)
    on_conflict = merge.check_on_conflict(str(cfg.get("on_conflict") or "error"))
    nodes = sources.values() if isinstance(sources, Mapping) else sources
    stream = merge.merge([_load_source(n, cache_dir, None) for n in nodes], on_conflict)
    log.info("merged %d sources into %d records", len(nodes), len(stream))
    return stream[:limit] if limit is not None else stream
