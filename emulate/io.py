"""Inputs (token ids from .npy, Arrow IPC, Parquet or text) and the streamed Arrow IPC output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from emulate.config import EmulateError, error_line
from graphs import files

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc", ".arrows")
TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_tokens(path: str) -> np.ndarray:
    """Token ids from .npy (1-D integers) or an Arrow IPC / Parquet table with an integer `token` column."""
    p = Path(path)
    if not p.is_file():
        raise EmulateError(f"input file {path} does not exist or is not a file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            _check_npy_size(p)
            ids = np.load(p, allow_pickle=False)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise EmulateError(f"{path}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
            return ids.astype(np.int64)
        if suffix in ARROW_SUFFIXES or suffix == ".parquet":
            table = pq.read_table(p) if suffix == ".parquet" else _read_arrow(p)
            if "token" not in table.column_names:
                raise EmulateError(f"{path}: no `token` column (columns: {', '.join(table.column_names) or 'none'})")
            column = table.column("token")
            if not pa.types.is_integer(column.type):
                raise EmulateError(f"{path}: column `token` must hold integers, not {column.type}")
            if column.null_count:
                raise EmulateError(f"{path}: column `token` has {column.null_count} nulls")
            return column.to_numpy().astype(np.int64)
    except EmulateError:
        raise
    except (OSError, ValueError, EOFError, MemoryError, pa.ArrowException) as err:
        raise EmulateError(f"{path}: cannot read token ids ({type(err).__name__}: {error_line(err)})") from None
    raise EmulateError(f"{path}: unknown input format {suffix or '(no suffix)'}; use .npy, .arrow, .parquet, "
                       "or --text / a .txt file for text")


def _check_npy_size(p: Path) -> None:
    """Refuse an .npy whose header promises more data than the file holds, before numpy allocates it."""
    with open(p, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f, max_header_size=10000)
        promised = int(np.prod(shape, dtype=object)) * dtype.itemsize
        held = p.stat().st_size - f.tell()
    if promised != held:
        raise EmulateError(f"{p}: the header promises {promised} bytes of data ({dtype} {shape}) but the file "
                           f"holds {held}; the file is truncated or not what it says")


def _read_arrow(p: Path) -> pa.Table:
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic == b"ARROW1":
        return pa.ipc.open_file(p).read_all()
    return pa.ipc.open_stream(p).read_all()


def read_text(path: str) -> str:
    """A UTF-8 text file; anything but a regular file (a FIFO would block forever) is refused."""
    p = Path(path)
    if not p.exists():
        raise EmulateError(f"input file {path} does not exist")
    if not p.is_file():
        raise EmulateError(f"input {path} is not a regular file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EmulateError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise EmulateError(f"{path}: cannot read text ({err.strerror or type(err).__name__})") from None


def check_text(text: str, what: str = "--text") -> str:
    """Text that encodes as UTF-8: a command line may carry undecodable bytes as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise EmulateError(f"{what} is not valid UTF-8 (character {err.start}: {err.reason})") from None
    return text


def byte_tokens(text: str) -> np.ndarray:
    """Byte-level tokens (the presets' tokenizer): each UTF-8 byte is one id in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def tokenizer_tokens(tokenizer_file: Path, text: str) -> np.ndarray:
    """Token ids from a checkpoint's tokenizer.json, with truncation and padding switched off.

    A long-context tool never drops text silently: a checkpoint's tokenizer often truncates to its
    training length (all-MiniLM-L6-v2: 128), which would cut a million-token input without a word.
    """
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the tokenizers library raises its own exception types
        raise EmulateError(f"{tokenizer_file}: cannot load tokenizer ({str(err).splitlines()[0]})") from None
    tok.no_truncation()
    tok.no_padding()
    return np.asarray(tok.encode(text).ids, dtype=np.int64)


# The embedded default text: two sections of the Python Language Reference as the interpreter ships
# them (pydoc_data, PSF licence), real English prose of about 4,300 SmolLM2 tokens (17 blocks of 256).
DEFAULT_TEXT_TOPICS = ("execmodel", "import")
DEFAULT_TEXT_NAME = "the Python Language Reference, 4. Execution model and 7.11 The import statement (pydoc_data)"


def default_text() -> str:
    """The embedded default input: real English text that ships with Python itself."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise EmulateError("the default text comes from Python's pydoc_data, which this Python lacks; "
                           "give --text or --input") from None
    return "\n\n".join(topics[t] for t in DEFAULT_TEXT_TOPICS)


def random_ids(n: int, vocab: int, seed: int) -> np.ndarray:
    """n seeded random token ids in [0, vocab)."""
    if n < 1:
        raise EmulateError(f"--random-tokens must be >= 1, got {n}")
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).numpy()


class OutputWriter:
    """Arrow IPC file written block by block under a temporary name and renamed when complete.

    Columns: position int64, token int32, logprob (the run's dtype; null at position 0; absent for
    encoders), hidden (fixed-size list of the run's dtype) when asked for or for encoders.
    """

    def __init__(self, path: str, tokens: np.ndarray, width: int, dtype: torch.dtype, logprob: bool, hidden: bool,
                 metadata: dict | None = None):
        self.file = AtomicOutput(path)
        try:  # from here on the temporary file exists: any exception, an interrupt included, removes it
            self.tokens = tokens
            self.logprob, self.hidden = logprob, hidden
            self.float_type = pa.float64() if dtype == torch.float64 else pa.float32()
            self.np_float = np.float64 if dtype == torch.float64 else np.float32
            fields = [pa.field("position", pa.int64()), pa.field("token", pa.int32())]
            if logprob:
                fields.append(pa.field("logprob", self.float_type))
            if hidden:
                fields.append(pa.field("hidden", pa.list_(self.float_type, width)))
            meta = {"emulate": json.dumps(metadata or {})}
            self.schema = pa.schema(fields, metadata=meta)
            self.sink = pa.OSFile(self.file.tmp, "wb")
            self.writer = pa.ipc.new_file(self.sink, self.schema)
        except BaseException:
            self.file.abort()
            raise
        self.start = 0
        self.carry = None  # log p of the next block's first token, computed from this block's last row

    def write(self, out) -> None:
        """Append one block's outputs (an emulate.BlockOutput), in block order."""
        h = out.hidden
        m = h.shape[0]
        s, e = self.start, self.start + m
        cols = [pa.array(np.arange(s, e, dtype=np.int64)), pa.array(self.tokens[s:e].astype(np.int32))]
        if self.logprob:
            nxt = out.logprobs.detach().cpu().numpy().astype(self.np_float)
            lp = np.empty(m, dtype=self.np_float)
            lp[0] = np.nan if self.carry is None else self.carry
            lp[1:] = nxt[: m - 1]
            self.carry = nxt[m - 1] if nxt.shape[0] >= m else None
            mask = np.zeros(m, dtype=bool)
            mask[0] = s == 0
            cols.append(pa.array(lp, type=self.float_type, mask=mask))
        if self.hidden:
            flat = pa.array(h.detach().cpu().numpy().astype(self.np_float).reshape(-1), type=self.float_type)
            cols.append(pa.FixedSizeListArray.from_arrays(flat, h.shape[1]))
        self.writer.write_batch(pa.record_batch(cols, schema=self.schema))
        self.start = e

    def close(self) -> None:
        self.writer.close()
        self.sink.close()
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
