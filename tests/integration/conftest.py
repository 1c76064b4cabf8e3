"""S3 fixtures: moto's S3-compatible server on 127.0.0.1, credentials only through the environment.

``s3_server`` (session) starts ``moto.server.ThreadedMotoServer`` on a free loopback port and
points the AWS_* environment variables at it (dummy keys, region us-east-1,
``AWS_ENDPOINT_URL``), isolating the tests from any user AWS config and proxy; everything is
restored at the end. ``s3_bucket`` (function) creates a fresh bucket and yields ``s3://name``.
``s3_auth_enforced`` switches moto's request authentication on for one test (moto accepts
any credentials unless told otherwise) and yields a valid IAM access key pair.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid

import pytest

TEST_ACCESS_KEY = "testing-access-key"
TEST_SECRET_KEY = "testing-secret-key-do-not-log"

_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "NO_PROXY",
    "no_proxy",
)


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:  # pragma: no cover
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _moto_api(endpoint: str, path: str, body: bytes) -> dict:
    """POST to moto's control API on loopback (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        f"{endpoint}{path}", data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read().decode("utf-8") or "{}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1; yields ``{"endpoint": url, "port": int}``."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        empty = tmp_path_factory.mktemp("aws-config") / "none"
        for key in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            os.environ.pop(key, None)
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,
                # no user config files, no instance-metadata lookups, no proxy for loopback
                "AWS_CONFIG_FILE": str(empty),
                "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                "AWS_EC2_METADATA_DISABLED": "true",
                "NO_PROXY": ",".join(filter(None, ["127.0.0.1", "localhost", saved.get("NO_PROXY")])),
                "no_proxy": ",".join(filter(None, ["127.0.0.1", "localhost", saved.get("no_proxy")])),
            }
        )
        _clear_s3fs_cache()
        yield {"endpoint": endpoint, "port": port}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_s3fs_cache()


@pytest.fixture
def s3_client(s3_server):
    import boto3

    client = boto3.client("s3")  # endpoint, region and keys from the environment
    yield client
    client.close()


@pytest.fixture
def s3_bucket(s3_server, s3_client):
    """A fresh, empty bucket; yields ``s3://<bucket>`` and deletes it afterwards."""
    name = f"cafm-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    _clear_s3fs_cache()
    yield f"s3://{name}"
    _clear_s3fs_cache()
    try:
        paginator = s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for item in page.get("Contents", []):
                s3_client.delete_object(Bucket=name, Key=item["Key"])
        s3_client.delete_bucket(Bucket=name)
    except Exception:  # best effort: moto keeps everything in memory anyway
        pass


@pytest.fixture
def s3_auth_enforced(s3_server, s3_bucket):
    """Make moto check signatures and IAM permissions; yields ``(bucket_url, key_id, secret)``.

    An IAM user with full S3 access is created while authentication is still off, then
    moto's ``/moto-api/reset-auth`` switches it on; it is switched off again afterwards.
    """
    import boto3

    iam = boto3.client("iam")
    user = f"cafm-test-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = iam.create_policy(
        PolicyName=f"{user}-s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    iam.attach_user_policy(UserName=user, PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    iam.close()
    _moto_api(s3_server["endpoint"], "/moto-api/reset-auth", b"0")
    try:
        yield s3_bucket, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _moto_api(s3_server["endpoint"], "/moto-api/reset-auth", b"inf")
        _clear_s3fs_cache()
