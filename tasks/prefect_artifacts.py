"""Pictures where people look: image artifacts the Prefect UI shows.

A Prefect image artifact is a URL the browser loads. Storage URLs (``file://``, ``s3://``)
are not loadable from the UI, so a picture is published inline, as a ``data:`` URL of its
PNG bytes, when it is small (the sample grids and curves here are tens of kB); a larger one
is published as its storage URL with a note, and lives on storage and in MLflow as before.
"""

from __future__ import annotations

import base64

from prefect.artifacts import create_image_artifact, create_markdown_artifact

__all__ = ["INLINE_LIMIT_BYTES", "publish_image"]

INLINE_LIMIT_BYTES = 1 << 20  # larger pictures are linked, not stored in Prefect's database


def publish_image(key: str, png: bytes, *, description: str, storage_url: str) -> str:
    """Publish ``png`` as the image artifact ``key``; returns the URL the artifact holds."""
    if len(png) <= INLINE_LIMIT_BYTES:
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        create_image_artifact(image_url=url, key=key, description=f"{description} (also at {storage_url})")
        return url
    create_markdown_artifact(key=key, markdown=f"{description}: {len(png) / 1e6:.1f} MB, too large to show "
                                               f"inline; on storage at `{storage_url}` and in MLflow.")
    return storage_url
