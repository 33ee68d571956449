"""Outputs: the streamed Arrow IPC file of a run, and files written whole, never half-written over a path."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from emulate.errors import EmulateError
from graphs import files


class OutputWriter:
    """Arrow IPC file written block by block under a temporary name and renamed when complete.

    Columns: position int64, token int32, logprob (the run's dtype, float32 for a 16-bit run; null at position
    0; absent for encoders), hidden (fixed-size list of the same type) when asked for or for encoders.
    """

    def __init__(self, path: str, tokens: np.ndarray, width: int, dtype: torch.dtype, logprob: bool, hidden: bool,
                 metadata: dict | None = None):
        self.file = AtomicOutput(path)
        try:  # from here on the temporary file exists: any exception, an interrupt included, removes it
            self.tokens = tokens
            self.logprob, self.hidden = logprob, hidden
            self.float_type = pa.float64() if dtype == torch.float64 else pa.float32()
            self.np_float = np.float64 if dtype == torch.float64 else np.float32
            self.torch_float = torch.float64 if dtype == torch.float64 else torch.float32
            fields = [pa.field("position", pa.int64()), pa.field("token", pa.int32())]
            if logprob:
                fields.append(pa.field("logprob", self.float_type))
            if hidden:
                fields.append(pa.field("hidden", pa.list_(self.float_type, width)))
            meta = {"emulate": json.dumps(metadata or {})}
            self.schema = pa.schema(fields, metadata=meta)
            self.sink = pa.OSFile(os.fsencode(self.file.tmp), "wb")  # bytes: a name the C locale decoded with surrogates
            self.writer = pa.ipc.new_file(self.sink, self.schema)
        except OSError as err:
            self.file.abort()
            raise EmulateError(str(files.write_error(self.file.path, err))) from None
        except BaseException:
            self.file.abort()
            raise
        self.start = 0
        self.carry = None  # log p of the next block's first token, computed from this block's last row

    def write(self, out) -> None:
        """Append one block's outputs (an emulate.BlockOutput), in block order."""
        try:
            self._write(out)
        except OSError as err:  # a full disk, a file size limit: one line, the partial file removed
            self.abort()
            raise EmulateError(str(files.write_error(self.file.path, err))) from None

    def _write(self, out) -> None:
        h = out.hidden
        m = h.shape[0]
        s, e = self.start, self.start + m
        cols = [pa.array(np.arange(s, e, dtype=np.int64)), pa.array(self.tokens[s:e].astype(np.int32))]
        if self.logprob:
            nxt = out.logprobs.detach().cpu().to(self.torch_float).numpy()
            lp = np.empty(m, dtype=self.np_float)
            lp[0] = np.nan if self.carry is None else self.carry
            lp[1:] = nxt[: m - 1]
            self.carry = nxt[m - 1] if nxt.shape[0] >= m else None
            mask = np.zeros(m, dtype=bool)
            mask[0] = s == 0
            cols.append(pa.array(lp, type=self.float_type, mask=mask))
        if self.hidden:
            # numpy has no bfloat16: a 16-bit run's values are written as float32, which holds them exactly
            flat = pa.array(h.detach().cpu().to(self.torch_float).numpy().reshape(-1),
                            type=self.float_type)
            cols.append(pa.FixedSizeListArray.from_arrays(flat, h.shape[1]))
        self.writer.write_batch(pa.record_batch(cols, schema=self.schema))
        self.start = e

    def close(self) -> None:
        try:
            self.writer.close()
            self.sink.close()
        except OSError as err:
            self.abort()
            raise EmulateError(str(files.write_error(self.file.path, err))) from None
        self.file.commit()

    def abort(self) -> None:
        try:
            self.writer.close()
            self.sink.close()
        except Exception:  # already broken: removing the partial file is what matters
            pass
        self.file.abort()


def atomic_write_text(path: str, text: str) -> None:
    """Write text under a temporary name beside the target, then rename it into place."""
    with AtomicOutput(path) as out:
        with open(out.tmp, "w", encoding="utf-8") as f:
            f.write(text)


def output_target(path) -> Path:
    """The file an output path writes, checked before any work (graphs/files.py, output_target)."""
    try:
        return files.output_target(path)
    except files.OutputError as err:
        raise EmulateError(str(err)) from None


def check_distinct(**paths) -> None:
    """Refuse, before any work, two of a command's files that are one file (the same path, or a
    link to it): the second written would replace the first, or an output its own input."""
    seen: dict[str, str] = {}
    for name, path in paths.items():
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise EmulateError(f"{seen[real]} and {name} are the same file {path}; give each its own path")
        seen[real] = name


class AtomicOutput(files.AtomicFile):
    """graphs/files.py's AtomicFile, with its refusals as EmulateError (one line, exit 2)."""

    def __init__(self, path):
        try:
            super().__init__(path)
        except files.OutputError as err:
            raise EmulateError(str(err)) from None

    def commit(self) -> None:
        try:
            super().commit()
        except files.OutputError as err:
            raise EmulateError(str(err)) from None

    def __exit__(self, kind, value, tb) -> None:
        try:
            super().__exit__(kind, value, tb)
        except files.OutputError as err:
            raise EmulateError(str(err)) from None
