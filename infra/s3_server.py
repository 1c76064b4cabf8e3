"""The stack's local S3-compatible server: moto's, checking every request's signature against
one key pair, the stack's own.

    python -m infra.s3_server --host 127.0.0.1 --port 9000

The key pair comes from this process's environment (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``: the stack passes its generated keys, ``<home>/s3-keys``). Before
the server answers, it registers one IAM user holding that pair with ``s3:*`` and switches
moto's request authentication on from the first request (``INITIAL_NO_AUTH_ACTION_COUNT=0``;
plain ``moto_server`` accepts any key unless told otherwise). A request signed with another
key, or not signed, is refused (``InvalidAccessKeyId`` / ``SignatureDoesNotMatch`` /
``AccessDenied``).

moto's control API (``/moto-api/...``) answers without any authentication: it can switch the
checks off again (``/moto-api/reset-auth``), wipe every bucket (``/moto-api/reset``) or dump
the server's state, IAM keys included (``/moto-api/data.json``). This server refuses every
``/moto-api`` path (403), the instance-metadata paths and any request that is not signed
(:class:`RefuseUnsigned`), so signed S3 calls are the only way in.

Presigned URLs (SigV4 query signing, what boto3 makes with ``signature_version="s3v4"``, e.g.
the URLs MLflow 3's tracking server hands its clients for direct artifact downloads) are
checked here, since moto's own check reads only the ``Authorization`` header: the stack's key
id, a time window that has not passed, and the signature over method, path, query and the
signed headers (:func:`presigned_ok`). A URL that passes is served without moto's header
check; any other is refused. Legacy SigV2 presigned URLs are refused.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from calendar import timegm
from urllib.parse import quote, unquote

USER = "cafm-stack"
BLOCKED_PREFIXES = ("/moto-api", "/latest/meta-data", "/latest/api")
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
MAX_PRESIGNED_S = 7 * 24 * 3600  # AWS's limit for a SigV4 presigned URL
CLOCK_SKEW_S = 15 * 60
_presigned = threading.local()  # set while moto serves a request whose presigned URL this server checked


def register_key(key_id: str, secret: str) -> None:
    """Make ``key_id``/``secret`` the key of an IAM user allowed ``s3:*`` (moto's default
    account, the one a request signed with an unknown key is checked in) and turn
    authentication on for every request from now on."""
    from moto import settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_user(region_name="us-east-1", user_name=USER)
    backend.put_user_policy(USER, "s3-all", json.dumps(S3_POLICY))
    key = backend.create_access_key(USER)  # moto's random pair, then replaced by ours
    backend.access_keys.pop(key.physical_resource_id)
    key.access_key_id, key.secret_access_key = key_id, secret
    backend.access_keys[key.physical_resource_id] = key
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    check = ActionAuthenticatorMixin._authenticate_and_authorize_action
    if not getattr(check, "cafm_presigned", False):
        def authenticate(self, iam_request_cls, resource="*"):
            if getattr(_presigned, "checked", False):  # its signature was checked in front of moto
                return None
            return check(self, iam_request_cls, resource)

        authenticate.cafm_presigned = True
        ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """The raw query's (name, value) pairs, percent-decoded (a literal ``+`` stays ``+``)."""
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def _header(environ, name: str) -> str:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}", "")
    return " ".join(str(value).split())


def presigned_ok(environ, key_id: str, secret: str, now: float | None = None) -> str | None:
    """None when the request is a SigV4 presigned URL signed with ``key_id``/``secret`` and not
    expired; else why not (the reason is sent back; it never holds the secret)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    raw_path, _, raw_query = raw.partition("?") if raw else (quote(environ.get("PATH_INFO", "")), "", environ.get("QUERY_STRING", ""))
    params = dict(_query_pairs(raw_query))
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return "Requests to this server must be signed with the stack's S3 keys (header or SigV4 presigned URL)"
    try:
        given_key, date, region, service, terminal = params["X-Amz-Credential"].split("/")
        stamp, expires, signed = params["X-Amz-Date"], int(params["X-Amz-Expires"]), params["X-Amz-SignedHeaders"]
        signature = params["X-Amz-Signature"]
        start = timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    except (KeyError, ValueError):
        return "Malformed presigned URL"
    if not hmac.compare_digest(given_key.encode(), key_id.encode()) or terminal != "aws4_request":
        return "The presigned URL is not signed with the stack's key"
    now = time.time() if now is None else now
    if not 0 < expires <= MAX_PRESIGNED_S or now > start + expires or start > now + CLOCK_SKEW_S or not stamp.startswith(date):
        return "The presigned URL has expired (or is not valid yet)"
    names = signed.split(";")
    if "host" not in names:
        return "Malformed presigned URL"
    query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(_query_pairs(raw_query)) if k != "X-Amz-Signature")
    canonical = "\n".join([environ.get("REQUEST_METHOD", "GET").upper(), quote(unquote(raw_path), safe="/~"), query,
                           "".join(f"{name}:{_header(environ, name)}\n" for name in names), signed, "UNSIGNED-PAYLOAD"])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
        return "The presigned URL's signature does not match"
    return None


def _refuse(start_response, message: str):
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            f"<Message>{message}</Message></Error>").encode()
    start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class RefuseUnsigned:
    """WSGI middleware in front of moto: 403 for its unauthenticated control and metadata
    paths, and for any request that neither has an ``Authorization`` header (moto checks that
    one) nor is a presigned URL that :func:`presigned_ok` accepts (moto would answer some of
    those with a 500 and a traceback, or serve them once its checks were off)."""

    def __init__(self, app, key_id: str, secret: str) -> None:
        self.app, self._key_id, self._secret = app, key_id, secret

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        if path.startswith(BLOCKED_PREFIXES) or path == "/favicon.ico":
            return _refuse(start_response, "moto's control API is switched off on this server")
        if environ.get("HTTP_AUTHORIZATION"):
            return self.app(environ, start_response)
        refused = presigned_ok(environ, self._key_id, self._secret)
        if refused:
            return _refuse(start_response, refused)
        _presigned.checked = True
        try:
            return self.app(environ, start_response)
        finally:
            _presigned.checked = False


def make_app(key_id: str, secret: str):
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return RefuseUnsigned(DomainDispatcherApplication(create_backend_app), key_id, secret)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.s3_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key_id and secret):
        print("error: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must name the key pair this server accepts",
              file=sys.stderr)
        return 2
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # before moto reads its settings
    os.environ.setdefault("MOTO_PORT", str(args.port))
    os.environ.pop("MOTO_ACCOUNT_ID", None)  # the key is registered in moto's default account
    from werkzeug.serving import run_simple

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    register_key(key_id, secret)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"S3 server on http://{args.host}:{args.port}: every request must be signed with the stack's key pair; "
          "/moto-api is refused", flush=True)
    run_simple(args.host, args.port, make_app(key_id, secret), threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
