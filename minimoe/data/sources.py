"""Where data comes from: a data spec (a local file or a file of a Hub dataset) read into records, each
kept with the place it came from, so that a complaint about any record names the file and line.

Specs (``minimoe train --data`` and ``minimoe eval --data``):

    path/to/file                         a local file
    hf://datasets/OWNER/NAME/PATH         a file of a Hub dataset repo; ``NAME@REVISION`` pins a branch,
                                          tag or commit; PATH may be a glob (``*``, ``?``, ``[...]``)
    OWNER/NAME:PATH                       the same, shorter (revision main)
    OWNER/NAME@SPLIT, OWNER/NAME:DIR@SPLIT  the data files of a split (``train``, ``test``, ...): those whose
                                          name has the split as a word (``test-00000-of-00001.parquet``,
                                          ``gsm8k_test.jsonl``) or that sit in a directory of that name,
                                          under DIR if given; all of one directory, or an error naming them

A local file that exists always wins. Hub files come through ``huggingface_hub`` (``hf_hub_download``):
its cache, its token, and ``HF_HUB_OFFLINE=1``, in which case a split or glob is matched against the
files already in the cache.

Formats, told by content rather than by name: a JSON array of objects, JSON Lines (one object per line,
blank lines skipped), either of them gzip-compressed (``.jsonl.gz``, ``.json.gz``), and Parquet (through
the optional ``pyarrow``: ``pip install 'minimoe[parquet]'``). JSON is read strictly: UTF-8 only (a bad
byte is named by line and column), no ``NaN``/``Infinity``, one object per record.

Provenance (``where``) reads ``FILE:LINE`` for JSON Lines, ``FILE:LINE (item I)`` for a JSON array (the
line the object starts on, I counted from 0) and ``FILE: row I`` for Parquet; FILE is the local path or
the ``hf://datasets/...`` URL of the Hub file.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import re
import zlib
from pathlib import Path, PurePosixPath

HF_PREFIX = "hf://datasets/"
_HF_URL = re.compile(r"hf://datasets/(?P<owner>[\w.-]+)/(?P<name>[\w.-]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)")
_SHORT = re.compile(r"(?P<owner>[\w.-]+)/(?P<name>[\w.-]+)(?::(?P<path>[^@]+))?(?:@(?P<split>[\w.-]+))?")
_GLOB = re.compile(r"[*?\[]")
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")  # what a split's files may be


class DataError(ValueError):
    """Bad data or a bad data spec: the message names the spec or file, and the line or row."""


def read_records(spec: str, filters=()) -> list[tuple[str, dict]]:
    """The records of a data spec, each as ``(where, record)``, in file order (files in name order).

    Args:
        spec: a local file, ``hf://datasets/OWNER/NAME/PATH``, ``OWNER/NAME:PATH`` or ``OWNER/NAME[:DIR]@SPLIT``.
        filters: ``KEY=VALUE`` strings; only records whose field KEY equals VALUE are kept (a non-string
            field is compared as JSON, e.g. ``level=5``). Several values of one key: any of them; several
            keys: all of them.

    Raises:
        FileNotFoundError: a local file that does not exist (and the spec is no Hub dataset).
        DataError: anything else: an unreadable or malformed file, a Hub file that cannot be had, an
            empty dataset, a filter that matches nothing.
    """
    records = []
    for name, path in resolve(spec):
        records += _read_file(name, path)
    if not records:
        raise DataError(f"{spec}: the dataset is empty")
    return select(records, filters, spec)


def resolve(spec: str) -> list[tuple[str, Path]]:
    """The files of a spec as ``(name, local path)``: a local file as given, Hub files downloaded (or
    found in the cache) and named by their ``hf://datasets/...`` URL."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [(str(Path(spec)), path)]
    if path.is_dir():
        raise DataError(f"{spec} is a directory; name a data file")
    hub = hub_parts(spec)
    if hub is None:
        hint = ("; a Hub dataset is named hf://datasets/OWNER/NAME/FILE, OWNER/NAME:FILE or OWNER/NAME@SPLIT"
                if re.fullmatch(r"[\w.-]+/[\w-]+", spec) else "")
        raise FileNotFoundError(f"data file {Path(spec)} does not exist{hint}")
    return _hub_files(spec, *hub)


def hub_parts(spec: str) -> tuple[str, str | None, str | None, str | None] | None:
    """``(repo_id, revision, path, split)`` of a Hub spec, or None for anything else (a local path)."""
    if spec.startswith("hf://"):
        m = _HF_URL.fullmatch(spec)
        if not m:
            raise DataError(f"{spec}: a Hub dataset file is written hf://datasets/OWNER/NAME/PATH "
                            "(NAME@REVISION to pin a revision)")
        return f"{m['owner']}/{m['name']}", m["rev"], m["path"], None
    m = _SHORT.fullmatch(spec)
    if not m or (m["path"] is None and m["split"] is None):
        return None
    return f"{m['owner']}/{m['name']}", None, m["path"], m["split"]


def holds_records(spec: str) -> bool:
    """Whether a spec names records (a Hub dataset, or a file named as JSON, JSON Lines, gzip or Parquet)
    rather than a plain-text document."""
    return hub_parts(spec) is not None or str(spec).endswith(DATA_SUFFIXES + (".gz",))


def select(records: list[tuple[str, dict]], filters, spec: str) -> list[tuple[str, dict]]:
    """The records that pass ``filters`` (``KEY=VALUE`` strings, see :func:`read_records`); a record
    without a filtered field, or no record left, is an error naming the spec and what was seen."""
    wanted: dict[str, set[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--data-filter {item!r}: expected KEY=VALUE (e.g. type=Algebra)")
        wanted.setdefault(key, set()).add(value)
    if not wanted:
        return records
    seen: dict[str, set[str]] = {key: set() for key in wanted}
    kept = []
    for where, record in records:
        keep = True
        for key, values in wanted.items():
            if key not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise DataError(f"{where}: --data-filter {key}=...: the record has no field {key!r} "
                                f"(fields: {fields})")
            value = record[key] if isinstance(record[key], str) else json.dumps(record[key], default=str)
            if len(seen[key]) <= 12:  # enough to show in an error
                seen[key].add(value)
            keep = keep and value in values
        if keep:
            kept.append((where, record))
    if not kept:
        shown = "; ".join(f"{key}: " + ", ".join(repr(v) for v in sorted(vals)[:12]) +
                          (", ..." if len(vals) > 12 else "") for key, vals in seen.items())
        raise DataError(f"{spec}: no record matches --data-filter {' '.join(filters)} (values seen: {shown})")
    return kept


# --- files ------------------------------------------------------------------------------------------------
def _read_file(name: str, path: Path) -> list[tuple[str, dict]]:
    """One file's records; the format is told by its first bytes (Parquet, gzip, then JSON)."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"PAR1":
            return _parquet(name, path)
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot be read ({e.strerror or e})") from None
    if magic[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name}: not a readable gzip file ({e})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (some editors write one)
    start = re.match(rb"[ \t\r\n]*", data).end()
    if data[start:start + 1] == b"[":
        return _json_array(name, data)
    return _json_lines(name, data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (Python's json module accepts it; minimoe does not)")


def _object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _json_lines(name: str, data: bytes) -> list[tuple[str, dict]]:
    records = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise DataError(f"{name}:{n}: {e}") from None
        records.append((f"{name}:{n}", _object(record, f"{name}:{n}")))
    return records


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(name: str, data: bytes) -> list[tuple[str, dict]]:
    """A JSON array read item by item, so that each record knows the line it starts on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{name}:{line}: not UTF-8 (byte {data[e.start]:#04x} at column {column})") from None
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    records, line, counted = [], 1, 0
    pos = _SPACE.match(text, _SPACE.match(text).end() + 1).end()  # past "["
    while not text.startswith("]", pos):
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{name}:{line} (item {len(records)})"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        records.append((where, _object(record, where)))
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            if text.startswith("]", pos):
                _malformed(name, text, pos, "a trailing comma")
        elif not text.startswith("]", pos):
            _malformed(name, text, pos, "expected ',' or ']' after an item")
    end = _SPACE.match(text, pos + 1).end()
    if end < len(text):
        _malformed(name, text, end, "extra data after the array")
    return records


def _malformed(name: str, text: str, pos: int, what: str):
    line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    raise DataError(f"{name}:{line}: malformed JSON ({what} at column {column})")


def _parquet(name: str, path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow: pip install 'minimoe[parquet]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: all say the file is unreadable
        raise DataError(f"{name}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [(f"{name}: row {i}", row) for i, row in enumerate(rows)]


# --- the Hub ----------------------------------------------------------------------------------------------
def _hub_files(spec: str, repo_id: str, revision: str | None, path: str | None,
               split: str | None) -> list[tuple[str, Path]]:
    if split is None and not _GLOB.search(path):
        names = [path]
    else:
        names = _matching(spec, _repo_files(spec, repo_id, revision), path, split)
    base = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    return [(f"{base}/{name}", _download(f"{base}/{name}", repo_id, revision, name)) for name in names]


def _matching(spec: str, files: list[str], path: str | None, split: str | None) -> list[str]:
    """The repo files a glob or a split names (several files must share one directory)."""
    if split is None:
        found = [f for f in files if fnmatch.fnmatchcase(f, path)]
        if not found:
            raise DataError(f"{spec}: no file of the dataset matches {path!r} ({_listing(files)})")
        return found
    under = path.strip("/") + "/" if path else ""
    data = [f for f in files if f.startswith(under) and f.endswith(DATA_SUFFIXES)]
    word = re.compile(rf"(^|[-_.]){re.escape(split)}([-_.0-9]|$)")
    found = [f for f in data if split in f[len(under):].split("/")[:-1] or word.search(PurePosixPath(f).name)]
    if not found:
        raise DataError(f"{spec}: no data file of split {split!r}" + (f" under {under}" if under else "")
                        + f" ({_listing(data)})")
    dirs = sorted({str(PurePosixPath(f).parent) for f in found})
    if len(dirs) > 1:
        owner_name = spec.split(":")[0].split("@")[0]
        raise DataError(f"{spec}: split {split!r} has files in several directories ({', '.join(dirs)}); "
                        f"name one, e.g. {owner_name}:{dirs[0]}@{split}")
    return found


def _listing(files: list[str]) -> str:
    if not files:
        return "it has no data files"
    return "files: " + ", ".join(files[:10]) + (f", ... ({len(files)} in all)" if len(files) > 10 else "")


def _repo_files(spec: str, repo_id: str, revision: str | None) -> list[str]:
    """The repo's files: listed by the Hub, or, offline or unreachable, those of the cached snapshot."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return sorted(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision))
        except Exception as e:  # noqa: BLE001  (a missing repo is said so; a network failure tries the cache)
            if _is_a(e, "RepositoryNotFoundError", "RevisionNotFoundError"):
                raise DataError(f"{spec}: {_hub_reason(e, repo_id, revision)}") from None
            reason = f"the Hub cannot be reached ({type(e).__name__})"
    else:
        reason = "HF_HUB_OFFLINE=1"
    root = Path(constants.HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--"))
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = root / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise DataError(f"{spec}: {reason} and dataset {repo_id} is not in the Hub cache ({constants.HF_HUB_CACHE})")
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _download(name: str, repo_id: str, revision: str | None, filename: str) -> Path:
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
    except Exception as e:  # noqa: BLE001  (every failure ends as one line naming the file and why)
        if _is_a(e, "LocalEntryNotFoundError"):
            why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
            raise DataError(f"{name}: {why} and the file is not in the Hub cache ({constants.HF_HUB_CACHE})") from None
        raise DataError(f"{name}: {_hub_reason(e, repo_id, revision)}") from None


def _is_a(error: Exception, *names: str) -> bool:
    """Whether ``error`` is one of huggingface_hub's errors by class name (their module moved between
    versions: ``huggingface_hub.utils`` before ``huggingface_hub.errors``)."""
    return any(c.__name__ in names for c in type(error).__mro__)


def _hub_reason(e: Exception, repo_id: str, revision: str | None) -> str:
    if _is_a(e, "GatedRepoError"):
        return f"dataset {repo_id} is gated: accept its terms on the Hub, then log in (hf auth login)"
    if _is_a(e, "RepositoryNotFoundError"):
        return f"no dataset {repo_id} on the Hub (a private one needs a login: hf auth login)"
    if _is_a(e, "RevisionNotFoundError"):
        return f"dataset {repo_id} has no revision {revision!r}"
    if _is_a(e, "EntryNotFoundError"):
        return f"no such file in dataset {repo_id}"
    return f"could not be fetched from the Hub ({type(e).__name__}: {e})"
