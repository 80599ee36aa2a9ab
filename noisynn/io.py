"""Writing results so that nothing half-written ever looks finished, and recording provenance.

Also what guards an output before the work that fills it: a path checked to be writable
(``check_output_file``, ``check_output_folder``), the header of a safetensors file read without
torch (``read_safetensors_header``), a lock per run folder (``run_lock``) and the clean-up of the
temp files a killed process left (``remove_stale_temp_files``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from noisynn.errors import UserError

# atomic_path's temp files: "." + the final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp$")
LOCK_NAME = ".lock"


def _shared_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0666 less the umask (0644 with umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    The file gets the umask's usual mode just before the rename, whatever wrote it: mkstemp
    creates 0600, and writers such as safetensors' ``save_file`` replace the file (and its mode).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # results are shared files (a lab's results folder): readable by the group as the rest are
        os.chmod(tmp, _shared_mode())
        # on disk before the rename, so a node crash cannot leave an empty file under the final name
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(final: Path, obj) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that ran, or ``unknown``; ``-dirty`` when a tracked file other than
    the results had changes. A run rewrites committed results as it goes (``results/``, and
    ``dvc.lock``, which ``dvc repro`` updates between its stages): those are not code."""
    here = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results",
                                ":(top,exclude)dvc.lock"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """Versions of what decides the numbers."""
    import numpy
    import timm
    import torch

    from noisynn import __version__

    return {
        "noisynn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def provenance(seed: int | None = None) -> dict:
    """Seed, commit and versions; the scheduler's job id too when SLURM ran the job."""
    record = {"seed": seed, "git_commit": git_commit(), "versions": versions()}
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record


# --- guarding outputs and inputs ---------------------------------------------------------------


def remove_stale_temp_files(folder: Path, finals: list[str] | None = None) -> list[Path]:
    """Delete the temp files ``atomic_path`` left in ``folder`` (a process killed mid-write).

    Only names of atomic_path's pattern (``.<final>.<8 characters>.tmp``), and, with ``finals``,
    only those of these final names. Call it where no other process writes the same files (a run
    folder under its lock, an output file about to be written). Returns what was deleted.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        m = _TEMP_NAME.match(entry.name)
        if m and (finals is None or m.group("final") in finals) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``folder`` (or, where it does not exist yet, a folder in its
    nearest existing ancestor): the one test that also holds for root and read-only mounts."""
    where = _nearest_existing(folder)
    if not where.is_dir():
        raise UserError(f"{what} {target} cannot be created: {where} is a file, not a folder.")
    try:
        if where == Path(os.path.abspath(folder)):
            fd, probe = tempfile.mkstemp(prefix=".noisynn-write-test.", suffix=".tmp", dir=where)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".noisynn-write-test.", dir=where))
    except OSError as e:
        raise UserError(f"{what} {target} cannot be written ({e.strerror or type(e).__name__} in {where}); "
                        "choose a writable place.") from None


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder of that name, a
    parent that is a file, or a place without write permission."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; expected the path of a file to write.")
    _probe_writable(path.parent, what, path)


def check_output_folder(path: Path, what: str) -> None:
    """Refuse, before any work, a run folder that cannot be written (an existing file of that name,
    a parent that is a file, no write permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is an existing file; expected a folder (it is created if missing).")
    _probe_writable(path, what, path)


def check_not_an_input(output: Path, what: str, inputs: dict[str, Path]) -> None:
    """Refuse an output that would overwrite one of the run's inputs (``inputs``: description → path)."""
    out = os.path.abspath(output)
    for name, path in inputs.items():
        if path is not None and os.path.abspath(path) == out:
            raise UserError(f"{what} {output} is {name}; writing it would destroy an input, choose another path.")


@contextlib.contextmanager
def run_lock(folder: Path, what: str):
    """Hold ``<folder>/.lock`` (``fcntl.flock``) for the block: one writer per run folder.

    A second process on the same folder gets a UserError at once. The kernel releases the lock
    when the holder dies, however it dies; a holder that ends normally removes the file. The lock
    is taken on the file the path names *now* (a holder may remove it between our open and our
    lock), so two processes never both believe they hold it.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _shared_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(path).read_text().strip()
            raise UserError(f"{what} {folder} is in use by another training ({holder or 'it holds ' + str(path)}); "
                            "wait for it to end, or choose another folder.") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors (name → (dtype, shape)) a safetensors file declares, after checking it is one.

    Reads only the header (no torch): the 8-byte length, the JSON header, and that the tensors'
    byte ranges fill the file exactly, so a truncated file, a pickle or zip renamed
    ``.safetensors``, or an empty file is named here instead of failing inside a loader.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (expected a .safetensors file).")
    size = path.stat().st_size

    def bad(why: str):
        return UserError(f"{what} {path} is not a readable safetensors file ({why}).")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n < 2 or n > min(size - 8, 100 << 20):
            raise bad("the header length is not plausible: a pickle, an archive, or a file cut short")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            itemsize = _SAFETENSORS_DTYPES.get(dtype)  # sub-byte and newer dtypes: not size-checked
            if begin < 0 or stop < begin or (itemsize is not None and stop - begin != count * itemsize):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    if 8 + n + end != size:
        raise bad(f"its tensors need {8 + n + end} bytes but the file has {size}: cut short or padded")
    return tensors
