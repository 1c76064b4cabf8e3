"""The stack's local S3 server (``python -m infra.s3_server``, moto behind a signature check)
as a process of its own: only its one key pair is accepted, from the first request; unsigned
requests and moto's control API are refused; the storage layer's check names wrong keys
("credentials rejected"); the pipeline's S3 clients (boto3 multipart, s3fs) work with the
right keys. A few seconds."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.config import environ_scope, free_port
from infra.health import http_status, port_open

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
KEY_ID, SECRET = "AKIAE2ETESTKEY000001", "the-s3-servers-only-secret-0123456789"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "PYTHONPATH": str(REPO)})
    child = subprocess.Popen([sys.executable, "-m", "infra.s3_server", "--host", "127.0.0.1", "--port", str(port)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open(port) and time.monotonic() < deadline:
            assert child.poll() is None, child.stdout.read().decode()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        output = child.communicate(timeout=20)[0].decode()
        assert SECRET not in output  # its log never holds the secret


def _client(url: str, key_id: str = KEY_ID, secret: str = SECRET):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1")


def test_the_stack_key_pair_works_for_every_client_the_pipeline_uses(server):
    import s3fs

    client = _client(server)
    client.create_bucket(Bucket="cafm-keys")
    client.put_object(Bucket="cafm-keys", Key="small", Body=b"x" * 10)
    client.upload_fileobj(io.BytesIO(os.urandom(9 * 1024 * 1024)), "cafm-keys", "multipart")  # 2 parts
    fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, client_kwargs={"endpoint_url": server, "region_name": "us-east-1"})
    with fs.open("cafm-keys/s3fs.bin", "wb") as handle:
        handle.write(os.urandom(6 * 1024 * 1024))
    assert fs.size("cafm-keys/s3fs.bin") == 6 * 1024 * 1024 and fs.cat("cafm-keys/small") == b"x" * 10
    assert {"small", "multipart", "s3fs.bin"} <= {o["Key"] for o in client.list_objects_v2(Bucket="cafm-keys")["Contents"]}


@pytest.mark.parametrize("key_id, secret, code", [(KEY_ID, "a-wrong-secret", "SignatureDoesNotMatch"),
                                                 ("AKIASOMEONEELSE00001", SECRET, "InvalidAccessKeyId"),
                                                 ("cafm-local", "cafm-local-secret", "InvalidAccessKeyId")])
def test_any_other_key_is_refused_from_the_first_request(server, key_id, secret, code):
    from botocore.exceptions import ClientError

    for call in (lambda c: c.list_buckets(), lambda c: c.create_bucket(Bucket="not-by-them"),
                 lambda c: c.get_object(Bucket="cafm-keys", Key="small")):
        with pytest.raises(ClientError) as refused:
            call(_client(server, key_id, secret))
        assert refused.value.response["Error"]["Code"] == code


def test_unsigned_requests_are_refused(server):
    for path in ("/", "/cafm-keys", "/cafm-keys/small"):
        assert http_status(server + path) == 403, path


def test_motos_control_api_is_closed_so_nobody_can_switch_the_checks_off(server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for path, body in (("/moto-api/reset-auth", b"inf"), ("/moto-api/reset", b""), ("/moto-api/data.json", None)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(urllib.request.Request(server + path, data=body, headers={"Content-Type": "text/plain"}), timeout=10)
        assert refused.value.code == 403, path
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):  # the checks are still on, the data still there
        _client(server, "AKIASOMEONEELSE00001", "x").list_buckets()
    assert _client(server).get_object(Bucket="cafm-keys", Key="small")["Body"].read() == b"x" * 10


def test_wrong_keys_get_the_storage_layers_clear_error(server):
    from tasks.storage import StorageError, check_reachable

    _client(server).create_bucket(Bucket="cafm-check")
    with environ_scope({"AWS_ENDPOINT_URL": server, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": "a-wrong-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}):
        with pytest.raises(StorageError, match="credentials rejected by the endpoint") as error:
            check_reachable("s3://cafm-check/runs")
        assert "a-wrong-secret" not in str(error.value)
    with environ_scope({"AWS_ENDPOINT_URL": server, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1"}):
        check_reachable("s3://cafm-check/runs")



def _stack_home(folder: Path, key_id: str, secret: str) -> Path:
    """A stack folder whose ``s3-keys`` (mode 0600, as ``up`` writes it) holds this pair."""
    from infra.auth import S3_KEYS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    keys = folder / S3_KEYS_FILE
    keys.write_text(f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n")
    keys.chmod(0o600)
    return folder


def test_the_stacks_bucket_check_signs_with_the_stacks_keys_whatever_boto3_resolved_before(server, tmp_path, monkeypatch):
    """``up`` makes the bucket with the stack's keys even in a process whose boto3 default
    session already resolved another pair (boto3 keeps it: a test session's moto keys, a
    notebook's profile) and whose environment holds a session token of the caller's."""
    import boto3

    from infra.config import StackConfig, StackError
    from infra.health import check_bucket

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # restored afterwards
    with environ_scope({"AWS_ACCESS_KEY_ID": "AKIASOMEONEELSE00001", "AWS_SECRET_ACCESS_KEY": "someone-elses-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}):
        boto3.client("s3", endpoint_url=server)  # the default session resolves (and keeps) this pair
    assert boto3.DEFAULT_SESSION.get_credentials().access_key == "AKIASOMEONEELSE00001"
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-callers-session-token")
    port = int(server.rsplit(":", 1)[1])
    config = StackConfig(home=_stack_home(tmp_path / "stack", KEY_ID, SECRET), s3_port=port, bucket="cafm-made-by-up")
    check_bucket(config, create=True)
    check_bucket(config, create=True)  # idempotent
    assert "cafm-made-by-up" in {b["Name"] for b in _client(server).list_buckets()["Buckets"]}
    assert os.environ["AWS_SESSION_TOKEN"] == "the-callers-session-token"  # put back after the check

    wrong = StackConfig(home=_stack_home(tmp_path / "wrong", KEY_ID, "not-the-servers-secret"), s3_port=port,
                        bucket="cafm-not-made")
    with pytest.raises(StackError, match="SignatureDoesNotMatch") as refused:
        check_bucket(wrong, create=True)
    assert "not-the-servers-secret" not in str(refused.value) and server in str(refused.value)

def _presigned(url: str, key: str = "small", secret: str = SECRET, expires: int = 300, version: str = "s3v4",
               method: str = "get_object") -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=secret,
                          region_name="us-east-1", config=Config(signature_version=version))
    return client.generate_presigned_url(method, Params={"Bucket": "cafm-keys", "Key": key}, ExpiresIn=expires)


def _fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_presigned_url_of_the_stack_key_is_served_as_s3_serves_it(server):
    """What MLflow 3's server hands its clients for direct artifact downloads (in byte ranges)."""
    _client(server).put_object(Bucket="cafm-keys", Key="dir/a file+name.bin", Body=bytes(range(256)) * 4)
    assert _fetch(_presigned(server)) == (200, b"x" * 10)
    status, body = _fetch(_presigned(server, key="dir/a file+name.bin"), headers={"Range": "bytes=256-511"})
    assert status == 206 and body == bytes(range(256))


def test_a_presigned_url_that_is_forged_altered_expired_or_reused_is_refused(server):
    good = _presigned(server)
    forged = _presigned(server, secret="not-the-secret")
    tampered = good.replace("X-Amz-Signature=", "X-Amz-Signature=0")[:len(good)]
    other_key = good.replace("/cafm-keys/small?", "/cafm-keys/multipart?")
    longer = good.replace("X-Amz-Expires=300", "X-Amz-Expires=3000")
    for url in (forged, tampered, other_key, longer):
        assert _fetch(url)[0] == 403, url
    assert _fetch(good, method="DELETE")[0] == 403  # signed for GET only
    assert _fetch(_presigned(server, version="s3"))[0] == 403  # legacy SigV2: refused
    from infra.s3_server import presigned_ok

    environ = {"REQUEST_METHOD": "GET", "HTTP_HOST": server[len("http://"):], "RAW_URI": good[len(server):]}
    assert presigned_ok(environ, KEY_ID, SECRET) is None
    assert "expired" in presigned_ok(environ, KEY_ID, SECRET, now=time.time() + 301)
    assert _client(server).get_object(Bucket="cafm-keys", Key="multipart")["ContentLength"] > 0  # nothing was deleted
