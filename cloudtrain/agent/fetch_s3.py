"""Fetch an S3 prefix into a folder (runs on the instance, with the job environment's Python).

    python3 -m cloudtrain_agent fetch-s3 --src s3://bucket/prefix/ --dst work/data/set

Credentials come from boto3's default chain: on AWS, the instance profile cloudtrain
made for the run (through the instance metadata service); in a dry-run, the simulated
role's stand-in in the host's environment. Never the user's keys. ``AWS_ENDPOINT_URL``,
when set, names the S3 endpoint.

Each object under the prefix lands under ``dst`` at its key's path relative to the
prefix (keys that would leave ``dst``, with ``..`` or absolute, are refused), written to
a temporary name then renamed. Objects already fetched with the same size and ETag
(recorded in a sidecar manifest next to ``dst``) are skipped. Prints one JSON line:
``{"files": N, "bytes": N, "skipped": N}``.

boto3 is imported lazily (the image's job environment has it). Python 3.7+.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import sys
import tempfile
from typing import Any, Iterator

from .errors import AgentError

MANIFEST_SUFFIX = ".cloudtrain-s3.json"
CHUNK = 1 << 20


def parse_src(src: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``."""
    if not src.startswith("s3://"):
        raise AgentError(f"not an S3 URL: {src!r}", "Use s3://bucket/prefix/.")
    bucket, _, prefix = src[len("s3://") :].partition("/")
    if not bucket:
        raise AgentError(f"no bucket in {src!r}", "Use s3://bucket/prefix/.")
    return bucket, prefix


def relative_key(key: str, prefix: str) -> str | None:
    """The key's path under the prefix ('' for the prefix itself as one object), or None
    when the key is not under it (``set`` does not contain ``settings/x``)."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if prefix and not prefix.endswith("/") and rest:
        if not rest.startswith("/"):
            return None
        rest = rest[1:]
    return rest


def check_relative(rel: str, key: str) -> str:
    """``rel`` as a safe relative path; refuse one that would leave dst."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts):
        raise AgentError(
            f"refusing S3 key {key!r}: it would be written outside the destination",
            "Rename the object: keys must not contain '..' or '.' segments or start with '/'.",
        )
    return posixpath.normpath(rel)


def s3_client(region: str | None) -> Any:
    """An S3 client with the instance's credentials (also what s3_checkpoint uses)."""
    try:
        import boto3  # type: ignore[import-untyped,unused-ignore]
        from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise AgentError(
            f"boto3 is not installed in the job environment ({sys.executable})",
            "Use the cloudtrain image (its job environment has boto3), or add `pip install boto3` "
            "to the job's setup.",
        ) from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or region
    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 8}}
    if endpoint:
        options["s3"] = {"addressing_style": "path"}
    session = boto3.session.Session(region_name=region)
    return session.client("s3", endpoint_url=endpoint, config=Config(**options))


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix``, page by page."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _manifest_path(dst: str) -> str:
    parent, name = os.path.split(os.path.normpath(dst))
    return os.path.join(parent, "." + name + MANIFEST_SUFFIX)


def _read_manifest(path: str, src: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("src") != src or not isinstance(data.get("objects"), dict):
        return {}
    objects: dict[str, Any] = data["objects"]
    return objects


def _write_manifest(path: str, src: str, objects: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"schema": 1, "src": src, "objects": objects}, f, sort_keys=True)
    os.replace(tmp, path)


def _download(client: Any, bucket: str, key: str, target: str) -> int:
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=folder)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(body, out, CHUNK)
        size = os.path.getsize(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def _client_error(error: Exception, src: str) -> AgentError:
    response = getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return AgentError(
            f"S3 refused access to {src} ({code})",
            "The run's instance profile allows only the job's buckets (s3:ListBucket, s3:GetObject); "
            "check the bucket's own policy and its KMS key.",
        )
    if code in ("NoSuchBucket", "404"):
        return AgentError(f"no such bucket: {src}", "Check `data:` in the job file.")
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return AgentError(
            f"no AWS credentials on the instance to read {src}",
            "The instance must be launched with cloudtrain's instance profile.",
        )
    return AgentError(f"fetching {src} failed: {error}", "")


def fetch(src: str, dst: str, region: str | None = None) -> dict[str, Any]:
    """Fetch every object under ``src`` into ``dst``; return ``{files, bytes, skipped}``."""
    bucket, prefix = parse_src(src)
    client = s3_client(region)
    manifest_path = _manifest_path(dst)
    known = _read_manifest(manifest_path, src)
    fetched: dict[str, Any] = {}
    files = total = skipped = 0
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped,unused-ignore]

    os.makedirs(os.path.dirname(os.path.normpath(dst)) or ".", exist_ok=True)
    try:
        seen = 0
        for item in list_objects(client, bucket, prefix):
            key = item["Key"]
            rel = relative_key(key, prefix)
            if rel is None or key.endswith("/"):  # not under the prefix, or a folder marker
                continue
            seen += 1
            target = dst if rel == "" else os.path.join(dst, *check_relative(rel, key).split("/"))
            record = {"etag": item.get("ETag", ""), "size": int(item.get("Size", 0))}
            present = os.path.isfile(target) and os.path.getsize(target) == record["size"]
            if known.get(rel) == record and present:
                skipped += 1
                fetched[rel] = record
                continue
            size = _download(client, bucket, key, target)
            files += 1
            total += size
            fetched[rel] = record
            if files % 100 == 0:  # progress survives an interruption
                _write_manifest(manifest_path, src, dict(known, **fetched))
    except (BotoCoreError, ClientError) as e:
        if fetched:
            _write_manifest(manifest_path, src, dict(known, **fetched))
        raise _client_error(e, src) from None
    if not seen:
        raise AgentError(
            f"no objects under {src}",
            "Check the bucket and prefix in `data:` (a prefix ending in / names a folder).",
        )
    _write_manifest(manifest_path, src, fetched)
    return {"files": files, "bytes": total, "skipped": skipped}
