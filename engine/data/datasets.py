"""Load a dataset as a list of records (dicts, one per row) from a local file, a directory, or the Hugging Face Hub.

Columns follow TRL's conventions: ``prompt`` (a string or a list of chat messages) for RL, plus whatever columns the
reward functions read (``answer``, ...). Local formats need nothing beyond the standard library except Parquet
(``pyarrow``); Hub datasets need the ``datasets`` package, which is optional. JSON and JSON Lines files may be
gzip-compressed (``.jsonl.gz``, ``.json.gz``, as Anthropic's HH-RLHF ships) and are decompressed while reading.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

_SUFFIXES = (".jsonl", ".json", ".parquet")
_GZ_SUFFIXES = (".jsonl.gz", ".json.gz")  # gzip-compressed text formats: the suffix before ".gz" is the format
_ALL_SUFFIXES = _SUFFIXES + _GZ_SUFFIXES
_JSON_LIST_KEYS = ("data", "train", "records", "rows", "examples")  # where a .json dict may keep its rows
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some Windows tools write first


def _file_suffix(path: Path) -> str:
    """The lower-cased format suffix of ``path``, with ``".gz"`` kept: ``".jsonl"``, ``".jsonl.gz"``, ``".csv"``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return Path(name[:-3]).suffix + ".gz"
    return Path(name).suffix


def _open_bytes(path: Path):
    """``path`` opened for reading bytes, decompressing it when its name ends in ``.gz``. Bytes, not text: a decoding
    error of a text stream surfaces a whole read-ahead chunk after its line, so lines are decoded one by one."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    """``raw`` (the bytes of ``path`` from the start of its line ``lineno``: one line, or the whole file) as UTF-8
    text; a byte-order mark at the start of the file is dropped. Raises ``ValueError`` naming the file, the line,
    the column and the bad byte."""
    if lineno == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1  # the bad byte's line, when raw holds several
        line = lineno + raw.count(b"\n", 0, err.start)
        raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                         f"{err.start - start + 1}: {err.reason}); re-encode the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON Lines file (gzip-compressed or not), one object per non-blank line. Raises ``ValueError``
    naming the line (malformed JSON, not UTF-8, not an object)."""
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(  # noqa: TRY004 - bad file content, like json's own errors
                    f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object (a record)")
            yield row


def _read_json(path: Path, split: str | None) -> list[Any]:
    """Rows of a ``.json`` file: a list of records, a dict holding one (under ``split``, ``"data"``, ``"train"``,
    ... or its only list value), or JSON Lines saved as ``.json`` (as ``datasets``' json loader accepts)."""
    with _open_bytes(path) as f:
        text = _decode(f.read(), path, 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines in a .json file
            return list(_iter_jsonl(path))
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        keys = ([split] if split else []) + [k for k in _JSON_LIST_KEYS if k != split]
        found = next((k for k in keys if isinstance(data.get(k), list)), None)
        if found is None:
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: a JSON object must hold the records as a list under one of {keys} "
                                 f"(or under its only list-valued key); its keys are {sorted(data)}")
            found = lists[0]
        data = data[found]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")  # noqa: TRY004
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {i} is a JSON {type(row).__name__}, expected an object")  # noqa: TRY004
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError as err:
        raise ImportError(f"reading {path} needs the 'pyarrow' package (pip install pyarrow), which is not "
                          f"installed ({err}); or convert the data to .jsonl") from None


def _read_file(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    suffix = _file_suffix(path)
    try:
        if suffix in (".jsonl", ".jsonl.gz"):
            rows = list(islice(_iter_jsonl(path), limit))
        elif suffix in (".json", ".json.gz"):
            rows = _read_json(path, split)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {list(_ALL_SUFFIXES)}")
    except (gzip.BadGzipFile, EOFError) as err:  # EOFError: a gzip stream cut short
        raise ValueError(f"{path}: not a valid gzip file ({err})") from None
    if not rows and limit != 0:
        raise ValueError(f"{path}: the file holds no records")
    return rows


def _split_files(directory: Path, split: str) -> list[Path]:
    """The files of ``split`` in ``directory``: ``<split>.jsonl|.json|.parquet|.jsonl.gz|.json.gz``, or the Hub's
    shards ``<split>-00000-of-00002.parquet`` (also in a ``data/`` subfolder), sorted."""
    for folder in (directory, directory / "data"):
        for suffix in _ALL_SUFFIXES:
            single = folder / f"{split}{suffix}"
            if single.is_file():
                return [single]
        shards = sorted(p for p in folder.glob(f"{split}-*") if _file_suffix(p) in _ALL_SUFFIXES and p.is_file())
        if shards:
            return shards
    return []


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(_ALL_SUFFIXES) or "\\" in source


def load_records(source: str | Path, *, split: str | None = None, limit: int | None = None,
                 **load_dataset_kwargs: Any) -> list[dict[str, Any]]:
    """The rows of a dataset as a list of dicts (column name -> value).

    Args:
        source: one of
            - a ``.jsonl`` file (one JSON object per line; blank lines skipped);
            - a ``.json`` file: a list of objects, or an object holding that list under ``split``, ``"data"``,
              ``"train"``, ``"records"``, ``"rows"``, ``"examples"`` or its only list-valued key (JSON Lines in a
              ``.json`` file are read too);
            - a ``.jsonl.gz`` or ``.json.gz`` file: the same, gzip-compressed (the suffix before ``.gz`` names the
              format; a ``.jsonl.gz`` file is decompressed as it is read, so ``limit`` stops early there too);
            - a ``.parquet`` file (needs ``pyarrow``, or ``pandas`` with a Parquet engine);
            - a directory holding ``<split>.jsonl`` / ``.json`` / ``.parquet`` (or ``.jsonl.gz`` / ``.json.gz``) or
              Hub-style shards
              ``<split>-*.parquet`` (directly or under ``data/``);
            - otherwise a Hugging Face dataset name (``"openai/gsm8k"``), read with
              ``datasets.load_dataset(source, split=split, **load_dataset_kwargs)`` (pass ``name="main"`` for a
              config) when the ``datasets`` package is installed.
        split: the split of a directory, a ``.json`` object or a Hub dataset (default ``"train"``); ignored for
            ``.jsonl`` (``.jsonl.gz``) and ``.parquet`` files, which hold one split.
        limit: keep the first ``limit`` rows (``None``: all). A ``.jsonl`` (``.jsonl.gz``) file is read only that
            far.

    Raises:
        FileNotFoundError: a path (absolute, relative with ``./``, or ending in a known suffix) that does not exist,
            or a directory without files for ``split`` (the message lists what it looked for).
        ValueError: an empty file or one without records, a malformed JSON line (its number is named), bytes that
            are not UTF-8 in a JSON or JSON Lines file (the line, column and byte are named; a leading byte-order
            mark is accepted), a row that is not an object, an unsupported suffix (``.parquet.gz`` included), a
            ``.gz`` file that is not valid gzip, a negative ``limit``.
        ImportError: Parquet without ``pyarrow``/``pandas``, or a Hub name without ``datasets`` (the message says
            to install it or to pass a local file).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        return _read_file(path, split, limit)[:limit]
    if path.is_dir():
        files = _split_files(path, split or "train")
        if not files:
            name = split or "train"
            raise FileNotFoundError(f"{path}: no file for split {name!r} (looked for {name}{{{','.join(_ALL_SUFFIXES)}}}"
                                    f" and {name}-*.parquet, also under data/)")
        rows: list[dict[str, Any]] = []
        for file in files:
            rows.extend(_read_file(file, split, None if limit is None else limit - len(rows)))
            if limit is not None and len(rows) >= limit:
                break
        return rows[:limit]
    if isinstance(source, Path) or _looks_like_path(source_str):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return _load_hub(source_str, split or "train", limit, load_dataset_kwargs)


def _load_hub(name: str, split: str, limit: int | None, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name!r} is neither a local file nor a directory, so it would be loaded from the Hugging "
                          "Face Hub, which needs the 'datasets' package (pip install datasets); it is not installed. "
                          "Or pass a local .jsonl/.json/.parquet file, or a directory holding <split>.jsonl") from None
    ds = datasets.load_dataset(name, split=split, **kwargs)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row) for row in ds]
