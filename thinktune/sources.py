"""Sources: read data rows from local files or a hub data set, one dict at a time.

Local files are read by thinktune itself, streamed row by row (a 200 MB JSONL file is
never held whole), so every problem can name its file and line: JSON Lines, a JSON
array (or JSON Lines in a .json file), CSV (header row; ',' or ';' or tab
as the header shows; trailing commas and CRLF line ends allowed), Parquet, and any of the text formats gzip'd (`.jsonl.gz`). Text
may carry a UTF-8 byte-order mark (what Excel and Windows Notepad write) or be UTF-16
with its mark; anything else must be UTF-8. Hub ids go through `datasets`.

This module knows nothing about columns' meaning (see formats.py) and never tokenises.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

from thinktune.errors import UserError
from thinktune.load_errors import hub_failure

KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
PEEK_ROWS = 50  # rows read ahead to learn the columns (JSON rows may differ in their keys)


@dataclass
class RowSource:
    """The rows of a data set: `columns` seen in the first rows, then (line number, row) pairs.

    `unit` names what the number counts ("line" for text files, "row" otherwise).
    """

    columns: list[str]
    rows: Iterator[tuple[int, dict[str, Any]]]
    unit: str = "row"


def kind_of(path: Path) -> str | None:
    """'jsonl', 'json', 'csv' or 'parquet' from the file name ('.jsonl.gz' -> 'jsonl'), None when unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    return KINDS.get(suffixes[-1]) if suffixes else None


def local_files(path: Path) -> list[Path]:
    """The data files of a file or folder path, all of one kind."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and kind_of(p))
        if not files:
            raise UserError(f"{path}: folder holds no .json/.jsonl/.csv/.parquet files")
        kinds = {kind_of(p) for p in files}
        if len(kinds) > 1:
            raise UserError(f"{path}: folder mixes file formats ({', '.join(sorted(map(str, kinds)))}); keep one format per folder")
        return files
    if kind_of(path) is None:
        shown = "".join(path.suffixes[-2:]) or "(none)"
        raise UserError(f"{path}: unknown data format '{shown}'; use .json, .jsonl, .csv or .parquet (optionally .gz)")
    return [path]


def looks_local(path: str) -> bool:
    local = Path(path).expanduser()
    return local.exists() or kind_of(local) is not None or path.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------- text files

def _open_binary(path: Path) -> tuple[Any, str]:
    """Open a (possibly gzip'd) file; the encoding comes from its byte-order mark (UTF-8 without one)."""
    try:
        raw = path.open("rb")
        head = raw.read(2)
        raw.seek(0)
        stream: Any = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        start = stream.peek(4)[:4]
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return stream, next((enc for bom, enc in BOMS if start.startswith(bom)), "utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, with a one-line error naming the line on bad bytes or a broken gzip stream."""
    stream, encoding = _open_binary(path)
    line_no = 0
    with stream:
        if encoding == "utf-16":  # lines cannot be cut on b"\n" bytes; decode as a whole stream
            reader: Iterator[Any] = io.TextIOWrapper(stream, encoding=encoding, newline="")
            decode = None
        else:
            reader, decode = stream, codecs.getincrementaldecoder(encoding)().decode
        while True:
            try:
                line = next(reader, None)
                if line is None:
                    return
                line_no += 1
                yield line_no, decode(line) if decode else line
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: line {line_no} is not valid {encoding.replace('-sig', '').upper()} "
                                f"(byte {exc.start} of the line: {exc.reason}); re-save the file as UTF-8") from None
            except (OSError, EOFError) as exc:
                raise UserError(f"{path}: the gzip stream is damaged after line {line_no} ({exc}); compress the file again") from None


def _first_char(path: Path) -> str:
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {line_no} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {line_no} is a JSON {type(row).__name__}, not an object of column: value pairs")
        yield line_no, row


def _json_array(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A file holding one JSON array of objects (or an object with one such array); numbered by row."""
    text = "".join(line for _, line in _lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: a JSON object, not rows; write a list of objects or one object per line (JSON Lines)")
        data = lists[0]
    for row_no, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {row_no} of the JSON array is a {type(row).__name__}, not an object")
        yield row_no, row


def _delimiter(header: str) -> str:
    """',' unless the header line holds more ';' or tabs (Excel in many locales writes ';')."""
    return max((",", ";", "\t"), key=lambda d: (header.count(d), d == ","))


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = (line for _, line in _lines(path))
    first = next(lines, None)
    if first is None:
        return
    reader = csv.reader(chain([first], lines), delimiter=_delimiter(first))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            extra = values[len(names):]
            if any(v.strip() for v in extra):
                raise UserError(f"{path}: line {reader.line_num} has {len(values)} fields but the header has {len(names)}; "
                                "quote fields that contain the delimiter")
            yield reader.line_num, {n: v for n, v in zip(names, values) if n}
    except csv.Error as exc:
        raise UserError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None


def _csv_columns(path: Path) -> list[str]:
    for _, line in _lines(path):
        if line.strip():
            return [h.strip() for h in next(csv.reader([line], delimiter=_delimiter(line))) if h.strip()]
    return []


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    row_no = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _file_rows(path: Path) -> tuple[Iterator[tuple[int, dict[str, Any]]], str]:
    kind = kind_of(path)
    if kind == "parquet":
        return _parquet_rows(path), "row"
    if kind == "csv":
        return _csv_rows(path), "line"
    first = _first_char(path)
    if first == "[" or (kind == "json" and first == "{" and not _is_json_lines(path)):
        return _json_array(path), "row"
    return _json_lines(path), "line"


def _is_json_lines(path: Path) -> bool:
    """A .json file whose first non-empty line is a whole JSON value is read as JSON Lines."""
    for _, line in _lines(path):
        if line.strip():
            try:
                json.loads(line)
                return True
            except json.JSONDecodeError:
                return False
    return True


def read_local(path: Path) -> RowSource:
    """Stream the rows of a local file or folder. Empty files end in one clear line."""
    files = local_files(path)
    units = set()
    streams = []
    for file in files:
        rows, unit = _file_rows(file)
        units.add(unit)
        streams.append(rows)
    rows = chain.from_iterable(streams)
    ahead = []
    for item in rows:
        ahead.append(item)
        if len(ahead) >= PEEK_ROWS:
            break
    if not ahead:
        if files[0].stat().st_size == 0 and len(files) == 1:
            raise UserError(f"{path}: the file is empty; it needs one row per question (e.g. JSON Lines with Question, Complex_CoT, Response)")
        header = _csv_columns(files[0]) if kind_of(files[0]) == "csv" else []
        what = f"a header ({', '.join(header)}) but no rows" if header else "no rows"
        raise UserError(f"{path}: holds {what}; add rows below the header" if header else f"{path}: holds no rows")
    columns: list[str] = []
    for _, row in ahead:
        columns += [c for c in row if c not in columns]
    return RowSource(columns, chain(ahead, rows), units.pop() if len(units) == 1 else "row")


def read_hub(path: str, subset: str | None, split: str) -> RowSource:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(path, subset, split=split)
    except ValueError as exc:
        raise UserError(f"data set {path} (subset {subset}, split {split}): {_first_line(exc, 300)}") from None
    except Exception as exc:  # the hub client's and datasets' many error types: hub_failure tells them apart
        raise UserError(f"{hub_failure(exc, repr(path))} (data.path; a local .jsonl/.csv/.parquet file or folder "
                        f"needs no Hub)") from None
    return RowSource(list(table.column_names), enumerate(iter(table), start=1), "row")


def _first_line(exc: BaseException, limit: int) -> str:
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def read_rows(path: str, subset: str | None, split: str) -> RowSource:
    """Rows of a local file/folder (streamed) or of a hub data set."""
    if looks_local(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise UserError(f"data file {path} not found")
        return read_local(local)
    return read_hub(path, subset, split)
