"""Files: written so that a reader sees the old content or the new, never half of it; JSON Lines read
with errors that name the file and line."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else set
    and restored at once (a thread creating a file in between would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(tmp_path)` into a temporary file next to `path`, then rename it over `path`. The file gets
    the permissions `open()` gives a new file (0666 less the umask), not the temporary file's 0600; an
    existing file at `path` is replaced, mode included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_dir(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp_dir)` into a temporary folder next to `path`, then rename it to `path`.

    A folder is never half-written at `path`: a crash during `write` leaves the old one. A rename
    cannot replace a non-empty folder, so an old `path` is first renamed aside (`.<name>.old`) and
    removed after the new one is in place. The folder gets the permissions `mkdir` would give it
    (0777 less the umask), not the temporary folder's 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def iter_json_lines(path: str | Path) -> Iterator[tuple[Any, str]]:
    """(record, "<path>, line <n>") for every non-blank line of a JSON Lines file; a line that is not
    JSON raises ValueError("<path>, line <n>: invalid JSON (<reason>)")."""
    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
