"""Downloading a dataset's official archive (``harness data fetch NAME``), checked, then imported."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm import tqdm

from harness.data import store
from harness.data.catalog import catalog_entry
from harness.data.datasets import MIRROR_ENV, import_from
from harness.errors import UsageError
from harness.paths import data_root

URL_ENV = "HARNESS_DATA_URL_{}"  # formatted with the upper-cased dataset name


def fetch_dataset(name: str, root: str | os.PathLike | None = None, url: str | None = None,
                  progress: bool = True, *, md5: str | None = None, sha256: str | None = None) -> Path:
    """Download, verify and import the official archive of ``name``; return the dataset's folder.

    The URL is ``url``, else ``$HARNESS_DATA_URL_<NAME>``, else the official one. The download must
    match ``md5``/``sha256`` when given, else the official archive's md5 (so a mirror URL must serve
    the official archive). A mismatch raises UsageError and deletes the download.
    """
    entry = catalog_entry(name)
    url = url or os.environ.get(URL_ENV.format(name.upper())) or entry.url
    expected = {"md5": md5, "sha256": sha256} if md5 or sha256 else {"md5": entry.md5}
    root = data_root(root)
    with store.locked(root, name):
        download, digests = _download(url, root, name, progress)
        try:
            for algorithm, want in expected.items():
                if want and digests[algorithm] != want.lower():
                    raise UsageError(
                        f"checksum mismatch for {url}: expected {algorithm} {want}, got "
                        f"{digests[algorithm]}; the download was deleted and nothing was imported")
            import_from(entry, download, root, progress, original=PurePosixPath(urlparse(url).path).name,
                        url=url)
        finally:
            download.unlink(missing_ok=True)
    return root / name


def _download(url: str, folder: Path, name: str, progress: bool) -> tuple[Path, dict[str, str]]:
    """Stream ``url`` to a hidden temp file in ``folder``; return it with its md5 and sha256."""
    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    handle, tmp_name = tempfile.mkstemp(prefix=f".{name}.download-", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                      desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    for digest in digests.values():
                        digest.update(chunk)
                    bar.update(len(chunk))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError, http.client.HTTPException)):
            raise UsageError(
                f"could not download {url}: {exc}; get the archive another way and run "
                f"`harness data import {name} FILE`, or set {MIRROR_ENV} to a folder holding it") from exc
        raise
    return tmp, {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}
