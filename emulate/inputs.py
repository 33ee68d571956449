"""Inputs: token ids from .npy, Arrow IPC, Parquet or text, the embedded default text, and seeded random ids."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from emulate.errors import EmulateError, error_line

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc", ".arrows")
TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_tokens(path: str, fits: Callable[[int], None] | None = None) -> np.ndarray:
    """Token ids from .npy (1-D integers) or an Arrow IPC / Parquet table with an integer `token` column.

    fits(n), when given, is told the number of ids from the file's own metadata (the .npy header,
    Parquet's row count, the Arrow batches' lengths, memory-mapped) before any id is read, so a small
    compressed file that holds 10^8 ids is refused before it is decompressed.
    """
    p = Path(path)
    if not p.is_file():
        raise EmulateError(f"input file {path} does not exist or is not a file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            shape = _check_npy_size(p)
            if fits is not None and len(shape) == 1:
                fits(int(shape[0]))
            ids = np.load(p, allow_pickle=False)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise EmulateError(f"{path}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
            return _int64_ids(ids, path)
        if suffix in ARROW_SUFFIXES or suffix == ".parquet":
            if suffix == ".parquet":
                parquet = pq.ParquetFile(pa.OSFile(os.fsencode(p)))  # bytes: a name the C locale decoded with surrogates
                names = parquet.schema_arrow.names
                if "token" not in names:
                    raise EmulateError(f"{path}: no `token` column (columns: {', '.join(names) or 'none'})")
                if fits is not None:
                    fits(parquet.metadata.num_rows)
                table = parquet.read(columns=["token"])
            else:
                table = _read_arrow(p)  # memory-mapped: its batches are counted before anything is copied
                if "token" not in table.column_names:
                    raise EmulateError(f"{path}: no `token` column (columns: {', '.join(table.column_names) or 'none'})")
                if fits is not None:
                    fits(table.num_rows)
            column = table.column("token")
            if not pa.types.is_integer(column.type):
                raise EmulateError(f"{path}: column `token` must hold integers, not {column.type}")
            if column.null_count:
                raise EmulateError(f"{path}: column `token` has {column.null_count} nulls")
            return _int64_ids(column.to_numpy(), path)
    except EmulateError:
        raise
    except (OSError, ValueError, EOFError, MemoryError, pa.ArrowException) as err:
        raise EmulateError(f"{path}: cannot read token ids ({type(err).__name__}: {error_line(err)})") from None
    raise EmulateError(f"{path}: unknown input format {suffix or '(no suffix)'}; use .npy, .arrow, .parquet, "
                       "or --text / a .txt file for text")


def _int64_ids(ids: np.ndarray, path) -> np.ndarray:
    """The ids as int64; an unsigned id past int64's range is named with its own value, not wrapped
    to a negative one."""
    if ids.dtype.kind == "u" and ids.dtype.itemsize >= 8 and ids.size:
        top = int(ids.max())
        if top > np.iinfo(np.int64).max:
            at = int(np.argmax(ids > np.iinfo(np.int64).max))
            raise EmulateError(f"{path}: token id {top} (first at position {at}) is out of range for a token id")
    return ids.astype(np.int64)


def _check_npy_size(p: Path) -> tuple[int, ...]:
    """Refuse an .npy whose header promises more data than the file holds, before numpy allocates it,
    and one of Python objects (reading it would need pickle, which is never used)."""
    with open(p, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f, max_header_size=10000)
        if dtype.hasobject:
            raise EmulateError(f"{p}: an array of Python objects ({dtype}); refused, since reading it would need "
                               "pickle; save the token ids as integers")
        promised = int(np.prod(shape, dtype=object)) * dtype.itemsize
        held = p.stat().st_size - f.tell()
    if promised != held:
        raise EmulateError(f"{p}: the header promises {promised} bytes of data ({dtype} {shape}) but the file "
                           f"holds {held}; the file is truncated or not what it says")
    return shape


def _read_arrow(p: Path) -> pa.Table:
    with open(p, "rb") as f:
        magic = f.read(6)
    source = pa.memory_map(os.fsencode(p))  # uncompressed batches are read in place, not copied
    if magic == b"ARROW1":
        return pa.ipc.open_file(source).read_all()
    return pa.ipc.open_stream(source).read_all()


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
