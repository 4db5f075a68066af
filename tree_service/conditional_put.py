"""Create-if-absent writes on the filesystems pyarrow.fs opens.

pyarrow.fs has no conditional write, so an object store would let a second writer of one
version overwrite the first. S3 has one (``PUT`` with ``If-None-Match: *``, answered 412 when
the key exists), which boto3 sends; the client is built from the very settings of the pyarrow
S3FileSystem (credentials, endpoint, scheme, region), so both talk to the same place as the
same user. Local folders use a hard link instead (see ``SnapshotStore.write``).
"""

from __future__ import annotations

import pyarrow.fs as pafs

from .errors import TreeServiceError, VersionExists


def supports_conditional_put(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.S3FileSystem)


def _s3_settings(fs: pafs.S3FileSystem) -> dict:
    # pyarrow exposes an S3FileSystem's constructor arguments only through its reduce tuple
    # (the form Ray and Dask use to ship it to workers); nothing is unpickled here.
    _, args = fs.__reduce__()
    return args[0] if args and isinstance(args[0], dict) else {}


def _client(fs: pafs.S3FileSystem):
    import boto3
    from botocore.config import Config

    s = _s3_settings(fs)
    unsupported = [k for k in ("role_arn", "external_id", "tls_ca_file_path") if s.get(k)]
    if unsupported:  # boto3 would write as another identity, or trust other certificates, than pyarrow
        raise TreeServiceError(f"tree storage on S3 with {unsupported} set: the conditional write that keeps tree versions "
                               "race-free cannot use the same settings; give the credentials through the environment instead")
    endpoint = s.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{s.get('scheme') or 'https'}://{endpoint}"
    # pyarrow addresses buckets by path behind an endpoint override and virtually on AWS itself
    style = "virtual" if s.get("force_virtual_addressing") or not endpoint else "path"
    kwargs = {"region_name": s.get("region") or None, "endpoint_url": endpoint,
              "config": Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": style})}
    if s.get("anonymous"):
        from botocore import UNSIGNED

        kwargs["config"] = kwargs["config"].merge(Config(signature_version=UNSIGNED))
    elif s.get("access_key"):
        kwargs.update(aws_access_key_id=s["access_key"], aws_secret_access_key=s.get("secret_key"),
                      aws_session_token=s.get("session_token") or None)
    return boto3.client("s3", **kwargs)


def put_if_absent(fs: pafs.FileSystem, path: str, data: bytes, what: str) -> None:
    """Write ``data`` at ``path`` (``bucket/key``) only if nothing is there; ``VersionExists``
    naming ``what`` when another writer created it first."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = path.partition("/")
    try:
        _client(fs).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except BotoCoreError as exc:  # no credentials, no connection: named, as pyarrow's own errors are
        raise TreeServiceError(f"s3://{path}: {what} could not be written: {type(exc).__name__}: {exc}") from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise VersionExists(f"{path}: {what} was written by another writer first") from None
        if code in ("NotImplemented", "InvalidArgument") or status == 501:
            raise TreeServiceError(f"s3://{path}: the object store refused a conditional write (If-None-Match: *), which "
                                   f"tree versions need to stay race-free: {code or status}") from exc
        raise
