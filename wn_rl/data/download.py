"""Dataset errors and the opt-in, checksum-verified download shared by the CIFAR-10 and MNIST loaders.

Nothing here runs unless a user asks for a download (``--download`` on the scripts,
``download=True`` in the loaders): tests and ordinary loading never touch the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DatasetError", "DatasetFormatError", "DatasetNotFoundError", "download_file", "md5sum"]


class DatasetError(Exception):
    """A dataset is missing, incomplete or malformed; the message says where and how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not where they were expected."""


class DatasetFormatError(DatasetError, ValueError):
    """A dataset file exists but is not in the expected format (or fails its checksum)."""


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(urls: str | Sequence[str], destination: str | Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``destination`` from the first of ``urls`` that answers and check its MD5.

    An existing file with the right checksum is kept (no network access). The download goes to a
    temporary file in the same directory and is moved into place only after the checksum matched, so
    an interrupted or corrupted transfer never leaves a file that looks complete.
    """
    destination = Path(destination)
    if destination.is_file() and md5sum(destination) == md5:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    urls = [urls] if isinstance(urls, str) else list(urls)
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            print(f"downloading {url} -> {destination}", flush=True)
            request = urllib.request.Request(url, headers={"User-Agent": "wn_rl"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            got = md5sum(tmp)
            if got != md5:
                errors.append(f"{url}: MD5 {got} != expected {md5}")
                continue
            os.replace(tmp, destination)
            return destination
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {destination.name}: " + "; ".join(errors) + ". Download it by hand from one of "
        f"{', '.join(urls)} into {destination.parent} (its MD5 must be {md5})."
    )
