"""Reading files out of an import source: a folder, a tar archive (any compression) or a zip archive."""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from harness.core.errors import UsageError

Wanted = Callable[[PurePosixPath], bool]


def _hidden(path: PurePosixPath) -> bool:
    """Dot files and macOS archive debris (``__MACOSX/``, ``._x``) are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


class LazyFiles(Mapping):
    """Relative path -> file bytes, each file read only when it is looked up (and not kept)."""

    def __init__(self, names: list[PurePosixPath], read: Callable[[PurePosixPath], bytes]):
        self._names = {name: None for name in names}  # ordered set
        self._read = read

    def __getitem__(self, name: PurePosixPath) -> bytes:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[PurePosixPath]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@contextlib.contextmanager
def open_files(path: Path, wanted: Wanted) -> Iterator[Mapping[PurePosixPath, bytes]]:
    """The regular files under ``path`` whose relative path passes ``wanted``, by relative path.

    Files of a folder or a zip archive are read on access, so a large ImageFolder is never held in
    memory at once; a tar archive is read in one sequential pass (a compressed archive is
    decompressed once) and its wanted files are held in memory, still encoded.
    """
    if path.is_dir():
        names = [PurePosixPath(f.relative_to(path).as_posix()) for f in sorted(path.rglob("*")) if f.is_file()]
        yield LazyFiles([n for n in names if not _hidden(n) and wanted(n)], lambda n: (path / n).read_bytes())
        return
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            infos = {PurePosixPath(i.filename): i for i in archive.infolist() if not i.is_dir()}

            def read(name: PurePosixPath) -> bytes:
                try:
                    return archive.read(infos[name])
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    raise _damaged(path, exc) from None

            yield LazyFiles([n for n in infos if not _hidden(n) and wanted(n)], read)
        return
    if tarfile.is_tarfile(path):
        found = {}
        try:
            with tarfile.open(path, mode="r|*") as archive:
                for member in archive:
                    rel = PurePosixPath(member.name)
                    if member.isfile() and not _hidden(rel) and wanted(rel):
                        found[rel] = archive.extractfile(member).read()
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise _damaged(path, exc) from None
        yield found
        return
    raise UsageError(f"{path} is neither a folder nor a .tar/.tar.gz/.zip archive")


def _damaged(path: Path, exc: BaseException) -> UsageError:
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return UsageError(f"{path} is a damaged or truncated archive ({detail}); get it again (`harness data fetch` "
                      f"checks the official checksum)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
