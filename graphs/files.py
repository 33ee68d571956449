"""Output files that never harm what stands at their path: the one implementation every writer uses.

A target is checked before any work (an existing path must be a regular file; a symlink writes the
file it points to), the data is written under a temporary name beside it with the mode a plain
open() would give, and renamed over it when complete; a failure or an interrupt leaves nothing.
graphs/ writes its pictures with it and emulate/inputs.py its run outputs, graphs and plots.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot or must not be written: one line, said before any work."""


def output_target(path) -> Path:
    """The file an output path writes, checked before any work; nothing that stands there is harmed.

    A symlink writes its target (the link stays a link); an existing path must be a regular file:
    a device, FIFO, socket or directory there is refused, since renaming over it would replace it.
    """
    if path is None or str(path) == "":
        raise OutputError("the output path is empty")
    given = Path(path)
    target = Path(os.path.realpath(given))
    if not target.parent.is_dir():
        if given.is_symlink():  # the link's own directory is there: say it is the link that leads nowhere
            raise OutputError(f"output {given} is a dangling symlink (to {os.readlink(given)}, whose directory "
                              "does not exist)")
        raise OutputError(f"output directory {given.parent} does not exist or is not a directory")
    _check_name_length(target, given)
    try:
        st = target.stat()
    except FileNotFoundError:
        return target
    except OSError as err:
        raise OutputError(f"cannot write {given}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {given} is a directory; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {given} exists and is not a regular file ({_file_kind(st.st_mode)}); "
                           "give a path to a new or regular file")
    return target


TEMPORARY_SUFFIX = len(".0123abcd.tmp")  # what _create_temporary adds to the target's name


def _check_name_length(target: Path, given: Path) -> None:
    """A name the OS takes, but not with the temporary suffix, is refused now, not after the work."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    if len(os.fsencode(target.name)) + TEMPORARY_SUFFIX > limit:
        raise OutputError(f"cannot write {given}: File name too long (at most {limit - TEMPORARY_SUFFIX} bytes here, "
                          "leaving room for the temporary name it is written under)")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _new_file_mode() -> int:
    """What a plain open() would give a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Temporary files not yet renamed or removed. A name is added before its file exists, so an
# interrupt that lands anywhere between the two (even before the AtomicFile is assigned to
# anything) still finds it: remove_pending is the interrupt's clean-up.
PENDING: set[str] = set()


def _create_temporary(target: Path, shown: str) -> tuple[int, str]:
    """(fd, name) of a new empty file beside `target`, registered in PENDING before it is created."""
    for _ in range(100):
        name = str(target.parent / f"{target.name}.{secrets.token_hex(4)}.tmp")
        PENDING.add(name)
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name
        except FileExistsError:
            PENDING.discard(name)
        except OSError as err:
            PENDING.discard(name)
            raise OutputError(f"cannot write {shown}: {err.strerror or err}") from None
    raise OutputError(f"cannot write {shown}: no free temporary name beside it")


def remove_pending() -> None:
    """Remove every temporary file that was neither renamed nor removed (after an interrupt)."""
    for name in list(PENDING):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        PENDING.discard(name)


class AtomicFile:
    """A file written under a temporary name beside its target and renamed over it when complete.

    Readers never see a half-written file, and a failed or interrupted run leaves nothing behind:
    `commit` renames, `abort` removes (as a context manager: commit on success, abort on any
    exception, interrupts included). The file gets the mode a plain open() would give it: the
    existing file's, or 0666 less the umask.
    """

    def __init__(self, path):
        self.path = str(path)
        self.target = output_target(path)
        try:
            mode = stat.S_IMODE(self.target.stat().st_mode)
        except FileNotFoundError:
            mode = _new_file_mode()
        fd, self.tmp = _create_temporary(self.target, self.path)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def commit(self) -> None:
        try:
            output_target(self.target)  # still nothing there that a rename would harm
            os.replace(self.tmp, self.target)
            PENDING.discard(self.tmp)
        except OutputError:
            self.abort()
            raise
        except OSError as err:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None

    def abort(self) -> None:
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass
        PENDING.discard(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
            return
        self.abort()
        if isinstance(value, OSError) and not isinstance(value, OutputError):
            # the disk filled (ENOSPC), a file size limit (EFBIG), an I/O error: the writer's own
            # error inside the block, one line about the output it was writing
            raise write_error(self.path, value) from None


def write_error(shown: str, err: OSError) -> OutputError:
    """An OSError met writing an output, as one line that names the path the user gave."""
    return OutputError(f"cannot write {shown}: {err.strerror or error_text(err)}")


def error_text(err: BaseException) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return lines[0] if lines else type(err).__name__


def write_file(path, data: bytes | str) -> None:
    """Write `data` to `path` through an AtomicFile."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with AtomicFile(path) as out:
        with open(out.tmp, "wb") as f:
            f.write(data)
