"""What the S3 tests share: the bucket name, fake credentials and environment hygiene for a moto S3 server on
127.0.0.1 (the `s3_endpoint` and `s3_client` fixtures in tests/conftest.py start it, one per test module).

s3fs (via aiobotocore/botocore) reaches it through the standard `AWS_ENDPOINT_URL` variable and fake credentials
from the environment, exactly as a real deployment would be configured; nothing here talks to AWS.
"""

from __future__ import annotations

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
