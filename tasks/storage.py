"""Stage outputs on fsspec storage: a local folder or ``s3://bucket/prefix`` on any S3 endpoint.

Credentials and the endpoint come only from the environment, never from parameters, so they
never reach logs, Prefect parameters or MLflow params. s3fs (through aiobotocore/botocore)
reads them itself: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (optionally
``AWS_SESSION_TOKEN``), ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (or the S3-only
``AWS_ENDPOINT_URL_S3``); botocore >= 1.31 honours the endpoint variables, checked for the
pinned versions by ``tests/integration``. A :class:`Store` pickles as its root URL only, so
a Ray worker that unpickles one uses the credentials of *its own* environment.

Writes are atomic per file: local files go through a temp file in the same folder and
``os.replace``; an S3 PUT (or a completed multipart upload) is atomic per object. Multi-file
outputs use a marker written last (``checkpoint.json`` for checkpoints, ``_COMPLETE.json``
for stages), so a reader never mistakes a half-written output for a finished one.
Transient errors (timeouts, dropped connections, 5xx) are retried with exponential backoff.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from cafm_core.checkpoint import MARKER_FILE, checkpoint_from_bytes, checkpoint_to_bytes

logger = logging.getLogger(__name__)

COMPLETE_FILE = "_COMPLETE.json"
"""Stage-completion marker, written last by :meth:`Store.mark_complete`."""

_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_S3_PROTOCOLS = ("s3://",)
_LOCAL_PREFIX = "file://"
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.EIO,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
    getattr(errno, "EREMOTEIO", 121),
}
# S3 client settings for ordinary stage I/O: botocore retries a few times itself, and
# Store adds its own backoff loop around whole operations.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
# For check_reachable: fail in seconds, no retries.
_S3_CHECK_CONFIG = {"connect_timeout": 3, "read_timeout": 5, "retries": {"total_max_attempts": 1}}

T = TypeVar("T")


class StorageError(ValueError):
    """Storage cannot be used as asked; the message names the URL (never a secret)."""


class IncompleteOutputError(StorageError):
    """An output's completion marker is missing: it was never finished (or is being rewritten)."""


def _redact(text: str) -> str:
    """``text`` with any secret from the environment replaced by ``***``."""
    for name in _SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _describe(error: BaseException) -> str:
    return _redact(f"{type(error).__name__}: {error}")


def _is_transient(error: BaseException) -> bool:
    """Whether a failed storage call is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(error, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _s3_filesystem(config_kwargs: dict, retries: int = 5):
    import s3fs

    # No instance cache: a cached filesystem would keep an endpoint/credentials from an
    # earlier environment. No listings cache: other processes write the same prefixes.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, config_kwargs=dict(config_kwargs))
    fs.retries = retries  # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs


def s3_storage_options() -> dict:
    """fsspec ``storage_options`` for ``s3://`` URLs read outside a Store (no caches; env credentials)."""
    return {"skip_instance_cache": True, "use_listings_cache": False, "config_kwargs": dict(_S3_CONFIG)}


def is_s3_url(url: str) -> bool:
    return isinstance(url, str) and url.startswith(_S3_PROTOCOLS)


SOURCE_SCHEMES = ("file://", "s3://")
"""What a data source URL may start with (besides a plain local path)."""


def check_source_url(source: str) -> None:
    """A data source that is not a built-in name must be a local path, ``file://...`` or
    ``s3://bucket/prefix``: fsspec would open any of its protocols (``http://``, ``gcs://``,
    ``memory://``, chained ``a::b`` URLs, ``data:`` URLs ...), and those are not what the
    pipeline reads, checks or credentials. Raises StorageError naming the source."""
    if not isinstance(source, str) or not source.strip():
        raise StorageError(f"data source must be a non-empty string, got {source!r}")
    scheme = source.split("://", 1)[0] + "://" if "://" in source else None
    if "::" in source or source.startswith("data:") or (scheme is not None and scheme not in SOURCE_SCHEMES):
        shown = scheme or ("a chained URL (::)" if "::" in source else "data:")
        raise StorageError(
            f"data source {source!r}: {shown} is not supported; give a built-in name, a local path, "
            f"file://<path> or s3://<bucket>/<prefix>"
        )
    if scheme == "s3://" and not source[len("s3://"):].split("/", 1)[0]:
        raise StorageError(f"data source {source!r} names no bucket; expected s3://<bucket>/<prefix>")


def _s3_endpoint_description() -> str:
    """The S3 endpoint the environment selects, for error messages (never credentials)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default endpoint"


def join_url(base: str, *parts: str) -> str:
    """``base/part1/part2`` with single slashes; parts may hold ``/`` but no ``..`` segments."""
    if not isinstance(base, str) or not base:
        raise StorageError(f"base URL must be a non-empty string, got {base!r}")
    pieces = [base.rstrip("/") or "/"]
    for part in parts:
        if not isinstance(part, str):
            raise StorageError(f"URL parts must be strings, got {part!r}")
        stripped = part.strip("/")
        if not stripped:
            raise StorageError(f"URL part must be non-empty, got {part!r} (joining onto {base})")
        if any(segment in ("..", ".") for segment in stripped.split("/")):
            raise StorageError(f"URL part {part!r} must not contain '.' or '..' segments")
        pieces.append(stripped)
    joined = pieces[0]
    for piece in pieces[1:]:
        joined = joined + piece if joined.endswith("/") else f"{joined}/{piece}"
    return joined


class Store:
    """Files under one storage root: a local folder or ``s3://bucket/prefix``.

    Methods take full URLs (as returned by :meth:`url`) on the same kind of storage as the
    root. ``retries`` attempts in all with exponential backoff starting at ``backoff_s``.
    """

    def __init__(self, root: str, *, retries: int = 4, backoff_s: float = 0.5) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
            raise StorageError(f"storage root must be a local path or an s3://bucket/prefix URL, got {root!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
            raise StorageError(f"retries must be an int >= 1, got {retries!r}")
        if not isinstance(backoff_s, (int, float)) or isinstance(backoff_s, bool) or backoff_s < 0:
            raise StorageError(f"backoff_s must be a number >= 0, got {backoff_s!r}")
        root = str(root).strip()
        if is_s3_url(root):
            bucket = root[len("s3://") :].split("/", 1)[0]
            if not bucket:
                raise StorageError(f"storage root {root!r} names no bucket; expected s3://bucket/prefix")
            self.kind = "s3"
            self.root = root.rstrip("/")
        elif "://" in root and not root.startswith(_LOCAL_PREFIX):
            raise StorageError(
                f"unsupported storage root {root!r}: expected a local path, file:// or s3://bucket/prefix"
            )
        else:
            self.kind = "local"
            self.root = os.path.abspath(root[len(_LOCAL_PREFIX) :] if root.startswith(_LOCAL_PREFIX) else root)
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self._fs = None

    # ---- plumbing ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __getstate__(self) -> dict:
        # Only the root and settings travel (e.g. to Ray workers); the filesystem is rebuilt
        # from the receiving process's environment.
        return {"kind": self.kind, "root": self.root, "retries": self.retries, "backoff_s": self.backoff_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs = None

    @property
    def is_s3(self) -> bool:
        return self.kind == "s3"

    @property
    def filesystem(self):
        """The fsspec filesystem (built on first use from the environment)."""
        if self._fs is None:
            if self.is_s3:
                self._fs = _s3_filesystem(_S3_CONFIG)
            else:
                import fsspec

                self._fs = fsspec.filesystem("file")
        return self._fs

    def url(self, *parts: str) -> str:
        """A URL under the root: ``Store("s3://b/run").url("data", "x.json") == "s3://b/run/data/x.json"``."""
        return join_url(self.root, *parts) if parts else self.root

    @staticmethod
    def join(base_url: str, *parts: str) -> str:
        return join_url(base_url, *parts)

    def fs_path(self, url: str) -> str:
        """The filesystem path of ``url`` (``bucket/key`` for S3, an absolute path locally)."""
        if not isinstance(url, str) or not url:
            raise StorageError(f"URL must be a non-empty string, got {url!r}")
        if self.is_s3:
            if not is_s3_url(url):
                raise StorageError(f"{url!r} is not an s3:// URL, but this store's root is {self.root}; use store.url(...)")
            path = url[len("s3://") :].rstrip("/")
            if not path:
                raise StorageError(f"{url!r} names no bucket")
            return path
        if url.startswith(_LOCAL_PREFIX):
            url = url[len(_LOCAL_PREFIX) :]
        elif "://" in url:
            raise StorageError(f"{url!r} is not a local path, but this store's root is the local folder {self.root}")
        return os.path.abspath(url)

    def _to_url(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 else path

    def _retry(self, action: str, url: str, operation: Callable[[], T]) -> T:
        """Run ``operation``; retry transient failures with exponential backoff, then fail clearly."""
        for attempt in range(1, self.retries + 1):
            try:
                return operation()
            except Exception as error:  # classified below; non-transient errors fail at once
                if isinstance(error, StorageError):
                    raise
                if isinstance(error, FileNotFoundError) and action == "read":
                    raise FileNotFoundError(f"{url} does not exist ({_describe(error)})") from error
                if not _is_transient(error):
                    where = f" (endpoint {_s3_endpoint_description()})" if self.is_s3 else ""
                    raise StorageError(f"cannot {action} {url}{where}: {_describe(error)}") from error
                if attempt == self.retries:
                    where = f" (endpoint {_s3_endpoint_description()})" if self.is_s3 else ""
                    raise StorageError(
                        f"cannot {action} {url}{where}: still failing after {self.retries} attempts: {_describe(error)}"
                    ) from error
                delay = self.backoff_s * (2 ** (attempt - 1))
                logger.warning(
                    "transient error on %s %s (attempt %d/%d), retrying in %.2fs: %s",
                    action, url, attempt, self.retries, delay, _describe(error),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- single files --------------------------------------------------------------------

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` atomically (replacing any existing file)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StorageError(f"data for {url} must be bytes, got {type(data).__name__}")
        path = self.fs_path(url)
        data = bytes(data)
        if self.is_s3:
            self._retry("write", url, lambda: self.filesystem.pipe_file(path, data))
        else:
            self._retry("write", url, lambda: write_local_atomic(path, lambda fh: fh.write(data)))

    def read_bytes(self, url: str) -> bytes:
        path = self.fs_path(url)
        if not self.is_s3 and os.path.isdir(path):
            raise StorageError(f"cannot read {url}: it is a folder")
        return self._retry("read", url, lambda: self.filesystem.cat_file(path))

    def write_json(self, url: str, obj: Any) -> None:
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise StorageError(f"cannot write {url}: value is not JSON-serialisable ({error})") from error
        self.write_bytes(url, text.encode("utf-8"))

    def read_json(self, url: str) -> Any:
        data = self.read_bytes(url)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StorageError(f"{url} is not valid JSON: {error}") from error

    def exists(self, url: str) -> bool:
        path = self.fs_path(url)
        return bool(self._retry("check", url, lambda: self.filesystem.exists(path)))

    def list(self, url: str) -> list[str]:
        """URLs of the direct children of ``url`` (files and folders), sorted; ``[]`` if missing."""
        path = self.fs_path(url)

        def listing() -> list[str]:
            try:
                names = self.filesystem.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return [name.rstrip("/") for name in names]

        names = self._retry("list", url, listing)
        return sorted(
            self._to_url(name)
            for name in names
            if name != path and not _is_temp_name(posixpath.basename(name))
        )

    def remove(self, url: str, recursive: bool = True) -> bool:
        """Delete a file or (``recursive``) a folder; returns False if nothing was there."""
        path = self.fs_path(url)
        if not self.exists(url):
            return False

        def delete() -> None:
            try:
                self.filesystem.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._retry("remove", url, delete)
        return True

    # ---- conditional writes (the run lease) ----------------------------------------------
    # One file changed only by whoever read its current version: locally under an exclusive
    # ``flock`` on a hidden lock file beside it (processes of one host, or NFSv4 clients);
    # on S3 with S3's conditional requests (``If-None-Match: *`` to create, ``If-Match: <ETag>``
    # to replace or delete), which AWS S3, MinIO and moto honour. An S3-compatible endpoint
    # that ignores those headers turns them into plain writes: two writers who read the same
    # version within the same moment may then both "win" (the race window is one round trip).

    def read_versioned(self, url: str) -> tuple[bytes, str] | None:
        """The file's bytes and its version (S3: the ETag; locally: the sha256 of the bytes),
        or None when there is no such file."""
        path = self.fs_path(url)
        if self.is_s3:
            from fsspec.asyn import sync

            bucket, _, key = path.partition("/")
            fs = self.filesystem

            async def get() -> tuple[bytes, str] | None:
                try:
                    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
                except FileNotFoundError:
                    return None
                async with response["Body"] as body:
                    data = await body.read()
                return data, str(response["ETag"])

            return self._retry("read", url, lambda: sync(fs.loop, get))

        def read_local() -> tuple[bytes, str] | None:
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()

        return self._retry("read", url, read_local)

    def write_if(self, url: str, data: bytes, *, version: str | None) -> bool:
        """Write ``data`` to ``url`` only if the file is as the caller last read it: absent
        (``version=None``) or still at ``version`` (from :meth:`read_versioned`). Returns
        False, writing nothing, when it is not."""
        path, data = self.fs_path(url), bytes(data)
        if self.is_s3:
            condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

            return self._retry("write", url, lambda: _conditionally(
                lambda: self.filesystem.pipe_file(path, data, **condition)))

        def put_local() -> bool:
            with _local_lock(path):
                current = _local_version(path)
                if current != version:
                    return False
                write_local_atomic(path, lambda fh: fh.write(data))
                return True

        return self._retry("write", url, put_local)

    def remove_if(self, url: str, version: str) -> bool:
        """Delete ``url`` only if it is still at ``version``; False (nothing deleted) if it
        changed or is gone."""
        path = self.fs_path(url)
        if self.is_s3:
            from fsspec.asyn import sync

            bucket, _, key = path.partition("/")
            fs = self.filesystem

            return self._retry("remove", url, lambda: _conditionally(
                lambda: sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=version)))

        def delete_local() -> bool:
            with _local_lock(path):
                if _local_version(path) != version:
                    return False
                os.unlink(path)
                return True

        return self._retry("remove", url, delete_local)

    # ---- folders -------------------------------------------------------------------------

    def _files_under(self, url: str) -> list[tuple[str, str]]:
        """``(relative name, filesystem path)`` of every file below ``url``."""
        path = self.fs_path(url)

        def find() -> list[str]:
            try:
                return self.filesystem.find(path)
            except FileNotFoundError:
                return []

        found = self._retry("list", url, find)
        out = []
        for name in found:
            name = name.rstrip("/")
            relative = posixpath.relpath(name, path) if not self.is_s3 else name[len(path) :].lstrip("/")
            if relative and relative != "." and not _is_temp_name(posixpath.basename(relative)):
                out.append((relative, name))
        return sorted(out)

    def download_dir(self, url: str, local_dir: str | os.PathLike) -> Path:
        """Copy every file below ``url`` into ``local_dir`` (each file written atomically).

        A key that would land outside ``local_dir`` (``..`` segments, an absolute name, or a
        symlink in ``local_dir`` pointing out of it) is refused before anything is written:
        a crafted bucket cannot write elsewhere on this machine."""
        files = self._files_under(url)
        if not files:
            raise FileNotFoundError(f"nothing to download: {url} holds no files")
        target = Path(local_dir)
        root = target.resolve()
        for relative, path in files:
            parts = relative.replace("\\", "/").split("/")
            inside = (root / relative).resolve()
            if relative.startswith("/") or ".." in parts or not inside.is_relative_to(root):
                raise StorageError(f"refusing to download {self._to_url(path)}: its name {relative!r} leaves the "
                                   f"target folder {target} (a '..' segment, an absolute name or a symlink)")
        for relative, path in files:
            local_path = target / relative
            if self.is_s3:
                self._retry(
                    "download", self._to_url(path),
                    lambda path=path, local_path=local_path: _get_local_atomic(self.filesystem, path, str(local_path)),
                )
            else:
                data = self.read_bytes(path)
                write_local_atomic(str(local_path), lambda fh, data=data: fh.write(data))
        return target

    def upload_dir(self, local_dir: str | os.PathLike, url: str, marker_last: str | None = None) -> list[str]:
        """Copy every file of ``local_dir`` to ``url``; ``marker_last`` (a relative name) goes last.

        An existing remote marker is removed before anything else is written, so during the
        upload (and after a failed one) the remote folder reads as incomplete.
        """
        source = Path(local_dir)
        if not source.is_dir():
            raise StorageError(f"cannot upload {source}: not an existing folder")
        relatives = sorted(
            p.relative_to(source).as_posix()
            for p in source.rglob("*")
            if p.is_file() and not _is_temp_name(p.name)
        )
        if not relatives:
            raise StorageError(f"cannot upload {source}: the folder holds no files")
        if marker_last is not None:
            if marker_last not in relatives:
                raise StorageError(f"marker {marker_last!r} is not a file in {source} (found {relatives[:5]})")
            relatives.remove(marker_last)
            marker_url = join_url(url, marker_last)
            self.remove(marker_url, recursive=False)
            relatives.append(marker_last)
        uploaded = []
        for relative in relatives:
            target = join_url(url, relative)
            self._put_file(str(source / relative), target)
            uploaded.append(target)
        return uploaded

    def _put_file(self, local_path: str, url: str) -> None:
        path = self.fs_path(url)
        if self.is_s3:
            self._retry("write", url, lambda: self.filesystem.put_file(local_path, path))
        else:
            def copy() -> None:
                with open(local_path, "rb") as src:
                    write_local_atomic(path, lambda fh: _copy_stream(src, fh))

            self._retry("write", url, copy)

    # ---- checkpoints ---------------------------------------------------------------------

    def write_checkpoint(self, url: str, tensors: Mapping, config: dict, metadata: dict | None = None) -> str:
        """Write a ``cafm_core`` checkpoint folder at ``url``; the ``checkpoint.json`` marker goes last."""
        files = checkpoint_to_bytes(tensors, config, metadata)  # validates before anything is written
        marker_url = join_url(url, MARKER_FILE)
        self.remove(marker_url, recursive=False)
        for name, data in files.items():
            if name != MARKER_FILE:
                self.write_bytes(join_url(url, name), data)
        self.write_bytes(marker_url, files[MARKER_FILE])
        return url

    def read_checkpoint(self, url: str) -> tuple[dict, dict, dict]:
        """Read and verify a checkpoint folder; returns ``(tensors, config, metadata)``."""
        marker_url = join_url(url, MARKER_FILE)
        try:
            marker = self.read_bytes(marker_url)
        except FileNotFoundError:
            raise IncompleteOutputError(
                f"checkpoint at {url} is incomplete: its marker {MARKER_FILE} is missing "
                "(the write did not finish, or nothing was saved there)"
            ) from None
        files = {MARKER_FILE: marker}
        try:
            listed = json.loads(marker.decode("utf-8")).get("files", {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            listed = {}  # checkpoint_from_bytes reports the malformed marker
        for name in listed if isinstance(listed, dict) else {}:
            if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
                continue  # checkpoint_from_bytes rejects it
            try:
                files[name] = self.read_bytes(join_url(url, name))
            except FileNotFoundError:
                pass  # checkpoint_from_bytes reports "listed but missing"
        return checkpoint_from_bytes(files)

    # ---- stage completion ----------------------------------------------------------------

    def mark_complete(self, stage_url: str, outputs: dict) -> dict:
        """Write ``stage_url/_COMPLETE.json`` (outputs + timestamp); call it after every other write."""
        if not isinstance(outputs, dict):
            raise StorageError(f"outputs must be a dict, got {type(outputs).__name__}")
        record = {"stage_url": stage_url, "outputs": outputs, "completed_at": _utc_now()}
        self.write_json(join_url(stage_url, COMPLETE_FILE), record)
        return record

    def completed(self, stage_url: str) -> dict | None:
        """The completion record of a finished stage, or None if it has not (yet) completed."""
        url = join_url(stage_url, COMPLETE_FILE)
        try:
            record = self.read_json(url)
        except FileNotFoundError:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
            raise StorageError(f"{url} is not a completion record (expected an object with 'outputs')")
        return record

    def clear_complete(self, stage_url: str) -> bool:
        """Remove the completion marker (before rewriting a stage); True if one was there."""
        return self.remove(join_url(stage_url, COMPLETE_FILE), recursive=False)


# ---- conditional-write helpers -------------------------------------------------------------


def _conditionally(request) -> bool:
    """Run an S3 conditional request: True when done, False when its condition no longer held
    (the object was created, changed or removed meanwhile)."""
    try:
        request()
    except (FileExistsError, FileNotFoundError):
        return False
    except OSError as error:
        if _precondition_failed(error):
            return False
        raise
    return True


def _precondition_failed(error: BaseException) -> bool:
    """Whether an S3 error says a conditional request's condition did not hold (412) or lost
    a race with another conditional request on the same key (409)."""
    cause = error.__cause__ if error.__cause__ is not None else error
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")


@contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock.tmp`` beside ``path`` (hidden from listings)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    descriptor = os.open(os.path.join(directory, f".{os.path.basename(path)}.lock.tmp"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _local_version(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        return None


# ---- local atomic helpers -----------------------------------------------------------------


def _copy_stream(src, dst, chunk: int = 8 << 20) -> None:
    while True:
        block = src.read(chunk)
        if not block:
            return
        dst.write(block)


def write_local_atomic(path: str, write: Callable[[Any], Any]) -> None:
    """Create parents, write via ``write(fh)`` to a temp file in the same folder, fsync, ``os.replace``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _get_local_atomic(fs, remote_path: str, local_path: str) -> None:
    directory = os.path.dirname(local_path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(local_path)}.{uuid.uuid4().hex}.tmp")
    try:
        fs.get_file(remote_path, tmp)
        os.replace(tmp, local_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- early reachability check -------------------------------------------------------------

_CREDENTIAL_ERROR_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
}


def check_reachable(root: str) -> None:
    """Fail fast, before compute, if the storage root cannot be written.

    Local: the folder is created if needed and a probe file written and removed. S3: the
    bucket is listed and a probe object written and deleted, with short timeouts and no
    retries, so an unreachable endpoint fails in a few seconds. Raises StorageError naming
    the URL (and for S3 the endpoint; never the keys).
    """
    store = Store(root)
    if not store.is_s3:
        _check_local(store.root)
    else:
        _check_s3(store.root)


def _check_local(root: str) -> None:
    probe = os.path.join(root, f".cafm-write-probe-{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"probe")
        os.unlink(probe)
    except OSError as error:
        raise StorageError(f"storage root {root} is not writable: {_describe(error)}") from error


def _check_s3(root: str) -> None:
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )
    from botocore.session import Session

    bucket, _, prefix = root[len("s3://") :].partition("/")
    where = f"storage root {root}"
    try:
        client = Session().create_client("s3", config=Config(**_S3_CHECK_CONFIG))
    except (BotoCoreError, ValueError) as error:
        raise StorageError(f"{where}: cannot create an S3 client from the environment: {_describe(error)}") from error
    endpoint = client.meta.endpoint_url
    where = f"{where} (endpoint {endpoint})"
    probe_key = posixpath.join(prefix, f".cafm-write-probe-{uuid.uuid4().hex}") if prefix else f".cafm-write-probe-{uuid.uuid4().hex}"
    step = "list"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        step = "write"
        client.put_object(Bucket=bucket, Key=probe_key, Body=b"probe")
        step = "delete"
        client.delete_object(Bucket=bucket, Key=probe_key)
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise StorageError(
            f"{where}: no usable S3 credentials in the environment "
            f"(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {_describe(error)}"
        ) from error
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as error:
        raise StorageError(
            f"{where}: endpoint unreachable ({_describe(error)}); check AWS_ENDPOINT_URL and that the server is up"
        ) from error
    except ClientError as error:
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = _redact(f"{code}: {info.get('Message', '')}".strip())
        if code in ("NoSuchBucket", "404") or (status == 404 and step == "list"):
            raise StorageError(f"{where}: bucket {bucket!r} does not exist ({detail})") from error
        if code in _CREDENTIAL_ERROR_CODES:
            raise StorageError(
                f"{where}: credentials rejected by the endpoint ({detail}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            ) from error
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            raise StorageError(
                f"{where}: access denied on {step} of bucket {bucket!r} ({detail}); the credentials were "
                "accepted but lack permission to list/write there"
            ) from error
        raise StorageError(f"{where}: S3 {step} check failed ({detail})") from error
    except BotoCoreError as error:
        raise StorageError(f"{where}: S3 {step} check failed: {_describe(error)}") from error
    finally:
        client.close()
