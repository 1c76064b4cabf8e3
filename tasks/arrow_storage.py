"""Storage URLs as pyarrow filesystems: how Ray Data and Ray Train reach our storage.

``tasks.storage.Store`` (fsspec) is the project's storage client; Ray reads Parquet shards
and writes its run directories through pyarrow instead, so the same URLs (a local path,
``file://`` or ``s3://bucket/key``) are turned into a pyarrow filesystem and a path here.
S3 credentials and the endpoint come from the environment (``AWS_*``), as for fsspec.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["filesystem_and_paths", "ray_storage", "run_directory", "s3_filesystem", "split_url"]


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem honouring ``AWS_ENDPOINT_URL``; credentials come from the environment."""
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # custom endpoints (MinIO, moto) ignore it; avoids a region lookup
    return pafs.S3FileSystem(**kwargs)


def split_url(url: str) -> tuple[str, str]:
    """``(scheme, path)`` where scheme is ``"s3"`` or ``"local"``; path is what pyarrow expects."""
    if url.startswith("s3://"):
        return "s3", url[len("s3://") :]
    if url.startswith("file://"):
        return "local", url[len("file://") :]
    if "://" in url:
        raise ValueError(f"unsupported URL scheme in {url!r}; expected a local path or s3://bucket/key")
    return "local", os.path.abspath(url)


def filesystem_and_paths(urls: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem for a list of URLs of one kind, and each URL's path on it."""
    schemes = {split_url(u)[0] for u in urls}
    if len(schemes) > 1:
        raise ValueError(f"URLs mix local paths and s3:// URLs ({urls[:3]}...); use one kind")
    scheme = schemes.pop()
    fs = s3_filesystem() if scheme == "s3" else pafs.LocalFileSystem()
    return fs, [split_url(u)[1] for u in urls]


def ray_storage(storage_path: str) -> tuple[pafs.FileSystem | None, str]:
    """Ray's ``storage_path`` as ``(filesystem, path)``: None and an absolute path for local
    storage (Ray resolves it), the S3 filesystem and ``bucket/key`` otherwise."""
    scheme, path = split_url(storage_path)
    if scheme == "s3":
        return s3_filesystem(), path.rstrip("/")
    return None, path


def run_directory(storage_path: str, run_name: str) -> tuple[pafs.FileSystem, str]:
    """A Ray run's directory under ``storage_path``: ``(filesystem, path)``, local included."""
    fs, base = ray_storage(storage_path)
    if fs is None:
        return pafs.LocalFileSystem(), os.path.join(os.path.abspath(base), run_name)
    return fs, f"{base}/{run_name}"
