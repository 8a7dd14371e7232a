"""What the S3 tests share: the bucket name, fake credentials, environment hygiene and moto's control API (reset,
refused credentials) for a moto S3 server on 127.0.0.1 (the `s3_endpoint` and `s3_client` fixtures in
tests/conftest.py start it, one per test module, reset to empty).

s3fs (via aiobotocore/botocore) reaches it through the standard `AWS_ENDPOINT_URL` variable and fake credentials
from the environment, exactly as a real deployment would be configured; nothing here talks to AWS.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator

import s3fs

BUCKET = "pixart-test"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Environment variables that could route requests elsewhere or pick up real credentials: removed for the module.
AWS_VARS_TO_CLEAR = (
    "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
    "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


def clear_s3fs_cache() -> None:
    """Forget cached S3FileSystem instances (they hold a client bound to one endpoint and one set of credentials)."""
    s3fs.S3FileSystem.clear_instance_cache()


# -- moto's control API -----------------------------------------------------------------------------------------------
# moto keeps its buckets and its authentication switch in process-global state, shared by every moto server started
# in this process: a server started for one test module would see another module's buckets unless it is reset.


def _moto_api(endpoint: str, action: str, body: bytes = b"") -> dict:
    req = urllib.request.Request(f"{endpoint}/moto-api/{action}", data=body, method="POST",
                                 headers={"Content-Type": "text/plain"})  # moto reads the raw body
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def reset_server(endpoint: str) -> None:
    """Empty every moto backend and switch IAM authentication off: a fresh server, whatever ran before."""
    _moto_api(endpoint, "reset")
    _moto_api(endpoint, "reset-auth", b"inf")


def set_auth(endpoint: str, initial_no_auth_action_count: str) -> str:
    """Set moto's IAM authentication ("0": every request is checked; "inf": never). Returns the previous setting."""
    answer = _moto_api(endpoint, "reset-auth", initial_no_auth_action_count.encode())
    return answer["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@contextlib.contextmanager
def refused_credentials(endpoint: str, key: str, secret: str) -> Iterator[None]:
    """Credentials the server refuses (IAM checks on, a key it does not know) for the block; the environment, the
    server's setting and the s3fs instance cache are restored after, however the block ends."""
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = key, secret
    clear_s3fs_cache()  # a cached filesystem would still carry the good credentials
    previous = set_auth(endpoint, "0")
    try:
        yield
    finally:
        set_auth(endpoint, previous)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        clear_s3fs_cache()  # never leave a filesystem holding the bad credentials behind
