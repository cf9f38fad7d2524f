"""Record writers for :class:`~torch_crit.monitor.KernelFlowMonitor`.

A writer is any object with ``write(step: int, record: dict) -> None`` and ``close() -> None``
(:class:`Writer`). A record is a flat ``dict`` of ``str`` → ``float | int | str | None``, always
holding ``"step"``. The built-in writers:

* :class:`JSONLWriter` — one JSON object per line; append + flush + fsync per record, so a
  crash loses at most the record being written (a torn last line is dropped on ``resume``).
  Non-finite floats are written as ``null`` (strict JSON) and their keys listed under
  ``"nonfinite"``.
* :class:`CSVWriter` — one row per record, same crash safety. **New keys:** the header is the
  union of all keys seen so far, in first-seen order. When a record brings a key the header
  lacks, the file is rewritten once with the widened header (earlier rows get empty cells),
  atomically (temporary sibling + ``os.replace``), then appending resumes. Cells: empty =
  missing, ``nan``/``inf``/``-inf`` = non-finite.
* :class:`TensorBoardWriter` — every numeric key becomes a scalar (tag = key) at ``step``
  (``time`` becomes the events' wall time);
  ``torch.utils.tensorboard`` is imported lazily (``pip install torch-crit[tensorboard]``).
* :class:`CallbackWriter` — calls ``fn(step, record)``.

``resume=True`` (JSONL, CSV): the existing file is kept, its logged steps are read back and
:meth:`has_step` reports them, so a rerun of the same training skips steps already logged
(the monitor does not even probe them when every writer has them).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Union, runtime_checkable

from torch_crit._io import atomic_open

__all__ = [
    "Writer",
    "JSONLWriter",
    "CSVWriter",
    "TensorBoardWriter",
    "CallbackWriter",
    "read_jsonl",
    "read_csv",
    "read_log",
    "as_writers",
]

PathLike = Union[str, "os.PathLike[str]"]


@runtime_checkable
class Writer(Protocol):
    """The writer protocol: ``write(step, record)`` and ``close()``.

    Optional: ``has_step(step) -> bool`` (resume support).
    """

    def write(self, step: int, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _is_nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _fsync_append(fh: io.TextIOBase, text: str) -> None:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


class _FileWriter:
    """Shared bookkeeping of the append-only file writers."""

    def __init__(self, path: PathLike, *, resume: bool) -> None:
        self.path = Path(path)
        self.resume = bool(resume)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._steps: set[int] = set()
        self._fh: Optional[io.TextIOWrapper] = None

    def has_step(self, step: int) -> bool:
        """Whether ``step`` is already in the file (only after ``resume=True``)."""
        return int(step) in self._steps

    @property
    def steps(self) -> frozenset[int]:
        """Steps present in the file."""
        return frozenset(self._steps)

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "_FileWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class JSONLWriter(_FileWriter):
    """Append records as JSON Lines, crash-safe (flush + fsync per record).

    Args:
        path: the ``.jsonl`` file.
        resume: keep an existing file and skip the steps it already holds; otherwise an
            existing file is replaced (truncated).
    """

    def __init__(self, path: PathLike, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        if self.resume and self.path.exists():
            good = _read_jsonl_lines(self.path)
            raw = self.path.read_text(encoding="utf-8")
            keep = "".join(line + "\n" for line in good)
            if keep != raw:  # a torn / corrupt tail from a crash: rewrite without it
                with atomic_open(self.path, "w", encoding="utf-8") as fh:
                    fh.write(keep)
            for line in good:
                self._steps.add(int(json.loads(line)["step"]))
            self._fh = open(self.path, "a", encoding="utf-8")
        else:
            self._fh = open(self.path, "w", encoding="utf-8")

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Append ``record`` (with ``"step": step``) unless ``step`` is already logged."""
        step = int(step)
        if step in self._steps:
            return
        if self._fh is None:
            raise RuntimeError(f"JSONLWriter({str(self.path)!r}) is closed; create a new writer to log again.")
        row = {"step": step, **{k: v for k, v in record.items() if k != "step"}}
        bad = [k for k, v in row.items() if _is_nonfinite(v)]
        if bad:
            row = {k: (None if k in bad else v) for k, v in row.items()}
            row["nonfinite"] = bad
        _fsync_append(self._fh, json.dumps(row, allow_nan=False) + "\n")
        self._steps.add(step)


def _read_jsonl_lines(path: Path) -> list[str]:
    """The complete, parseable lines of a JSONL file (a torn last line is dropped)."""
    good: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            s = line.rstrip("\n")
            if not s.strip():
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                break  # everything after a torn line is not trusted
            if not isinstance(obj, dict) or "step" not in obj or not line.endswith("\n"):
                break
            good.append(s)
    return good


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Read a monitor JSONL log; ``null`` entries listed in ``"nonfinite"`` become ``nan``.

    Returns:
        The records in file order.
    """
    out = []
    for line in _read_jsonl_lines(Path(path)):
        rec = json.loads(line)
        for k in rec.pop("nonfinite", []) or []:
            if rec.get(k) is None:
                rec[k] = float("nan")
        out.append(rec)
    return out


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    return str(v)


def _csv_parse(s: str) -> Any:
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


class CSVWriter(_FileWriter):
    """Append records as CSV rows, crash-safe; the header widens when new keys appear.

    See the module docstring for the header rule (one atomic rewrite per widening).

    Args:
        path: the ``.csv`` file.
        resume: keep an existing file and skip the steps it already holds.
    """

    def __init__(self, path: PathLike, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        self._columns: list[str] = []
        if self.resume and self.path.exists():
            header, rows = _read_csv_rows(self.path)
            self._columns = header
            # rewrite without a torn tail, if any
            self._rewrite(rows)
            for r in rows:
                self._steps.add(int(r["step"]))
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
        else:
            self._fh = open(self.path, "w", encoding="utf-8", newline="")

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        with atomic_open(self.path, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            if self._columns:
                w.writerow(self._columns)
                for r in rows:
                    w.writerow([r.get(c, "") for c in self._columns])

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Append ``record`` as a row (widening the header first if it has new keys)."""
        step = int(step)
        if step in self._steps:
            return
        if self._fh is None:
            raise RuntimeError(f"CSVWriter({str(self.path)!r}) is closed; create a new writer to log again.")
        row = {"step": step, **{k: v for k, v in record.items() if k != "step"}}
        new = [k for k in row if k not in self._columns]
        if new:
            old_rows = _read_csv_rows(self.path)[1] if self._columns else []
            self._columns = (self._columns or []) + new
            self._rewrite(old_rows)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
        buf = io.StringIO()
        csv.writer(buf).writerow([_csv_cell(row.get(c)) for c in self._columns])
        _fsync_append(self._fh, buf.getvalue())
        self._steps.add(step)


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return [], []
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]  # drop a torn tail
    reader = csv.reader(io.StringIO(complete))
    try:
        header = next(reader)
    except StopIteration:
        return [], []
    rows = []
    for cells in reader:
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return header, rows


def read_csv(path: PathLike) -> list[dict[str, Any]]:
    """Read a monitor CSV log; empty cells are dropped, numbers parsed, ``nan``/``inf`` kept."""
    _, rows = _read_csv_rows(Path(path))
    return [{k: _csv_parse(v) for k, v in r.items() if v != ""} for r in rows]


def read_log(path: PathLike) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` monitor log (by suffix)."""
    p = Path(path)
    if p.suffix == ".csv":
        return read_csv(p)
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(p)
    raise ValueError(f"read_log: unknown log format {p.suffix!r} for {str(p)!r}; accepted: .jsonl, .csv.")


class TensorBoardWriter:
    """Write numeric record entries as TensorBoard scalars (tag = key, global step = ``step``).

    Args:
        log_dir: event-file directory (``SummaryWriter(log_dir)``).
        flush_each: flush the event file after every record (default ``True``: crash-safe).
        **kwargs: passed to :class:`torch.utils.tensorboard.SummaryWriter`.

    Raises:
        ImportError: tensorboard is not installed (``pip install torch-crit[tensorboard]``).
    """

    def __init__(self, log_dir: PathLike, *, flush_each: bool = True, **kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "TensorBoardWriter needs the 'tensorboard' package, which is not installed: "
                "pip install torch-crit[tensorboard]  (or: pip install tensorboard). "
                f"Import error: {exc}"
            ) from exc
        self.log_dir = Path(log_dir)
        self.flush_each = bool(flush_each)
        self._sw = SummaryWriter(log_dir=str(self.log_dir), **kwargs)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Add every numeric, non-bool entry except ``step`` and ``time`` as a scalar.

        ``time`` (the record's wall-clock stamp) is passed as the event's ``walltime``.
        """
        if self._sw is None:
            raise RuntimeError("TensorBoardWriter is closed; create a new writer to log again.")
        walltime = record.get("time")
        walltime = float(walltime) if isinstance(walltime, (int, float)) and not isinstance(walltime, bool) else None
        for k, v in record.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self._sw.add_scalar(k, float(v), global_step=int(step), walltime=walltime)
        if self.flush_each:
            self._sw.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._sw is not None:
            self._sw.close()
            self._sw = None


class CallbackWriter:
    """Call ``fn(step, record)`` for every record (e.g. to forward to wandb or a logger).

    Args:
        fn: the callback; it receives a copy of the record.
        on_close: optional ``() -> None`` called by :meth:`close`.
    """

    def __init__(self, fn: Callable[[int, dict[str, Any]], Any], on_close: Optional[Callable[[], Any]] = None) -> None:
        if not callable(fn):
            raise TypeError(f"CallbackWriter needs a callable fn(step, record); got {type(fn).__name__}.")
        self.fn = fn
        self.on_close = on_close

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Forward ``(step, dict(record))`` to the callback."""
        self.fn(int(step), dict(record))

    def close(self) -> None:
        """Call ``on_close`` if given."""
        if self.on_close is not None:
            self.on_close()


def as_writers(writers: Union[None, Writer, Callable, Iterable[Any], PathLike]) -> list[Any]:
    """Normalise the ``writers=`` argument: a path (``.jsonl``/``.csv``), a writer, a callable, or a list."""
    if writers is None:
        return []
    if isinstance(writers, (str, os.PathLike)):
        return [_writer_for_path(writers)]
    if hasattr(writers, "write") and hasattr(writers, "close"):
        return [writers]
    if callable(writers):
        return [CallbackWriter(writers)]
    out = []
    for w in writers:
        out.extend(as_writers(w))
    return out


def _writer_for_path(path: PathLike) -> Any:
    p = Path(path)
    if p.suffix == ".csv":
        return CSVWriter(p)
    if p.suffix in (".jsonl", ".ndjson"):
        return JSONLWriter(p)
    raise ValueError(f"cannot infer a writer for {str(p)!r}: use a .jsonl or .csv path, or pass a writer "
                     "object (JSONLWriter, CSVWriter, TensorBoardWriter, CallbackWriter).")
