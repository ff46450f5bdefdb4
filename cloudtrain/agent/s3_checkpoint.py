"""Checkpoints to S3 and back (on the instance, in the job environment's Python, with boto3).

A run's checkpoint folder (checkpoint.py's format) maps onto keys under the run's URL,
``s3://bucket/prefix/<run-id>/``:

    <folder>/<file>    every file the manifest lists (a saved folder never changes once named)
    manifest.json      the manifest, put last: a checkpoint counts in S3 once it is there

``Uploader`` (a thread of the supervisor, while the job runs) puts each new checkpoint:
the files S3 lacks, checked against the manifest's sizes, then the manifest; only then
does it delete the folders neither this manifest nor the one before names (as the local
store prunes). It uploads from a hard-link snapshot of the latest save
(``checkpoint.snapshot``), so a trainer that saves faster than an upload takes cannot
prune the save under it: every round puts a whole checkpoint. An upload cut short, by
the instance going away, leaves S3's previous manifest and its files whole.

``restore(url, directory)`` (the ``checkpoint-s3`` command, before training starts on a
new instance) brings S3's checkpoint into ``directory`` when it is further on than the one
already there (the controller's copy, pushed first): its files into a staging folder, each
checked against the manifest's size and sha256, then swapped in.

Credentials come from boto3's chain: the run's instance profile (a dry-run: the simulated
role's stand-in in the host's environment), never the user's keys. Python 3.7+.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any, Callable

from .checkpoint import MANIFEST, Invalid, read_manifest, sha256_file, snapshot
from .errors import AgentError
from .fetch_s3 import list_objects, parse_src, s3_client

URL_ENV = "CLOUDTRAIN_CHECKPOINT_S3"
REGION_ENV = "CLOUDTRAIN_CHECKPOINT_S3_REGION"
POLL_S = 1.0
FINAL_UPLOAD_S = 120.0  # after the job: the last checkpoint's upload may take this long


def progress(manifest: dict[str, Any] | None) -> tuple[int, int]:
    """How far a checkpoint got: (the fit of its latest save, that save's epoch); fits run in order."""
    if not manifest:
        return (-1, -1)
    try:
        return (int(manifest.get("fit", -1)), int(manifest.get("epoch", -1)))
    except (TypeError, ValueError):
        return (-1, -1)


def folders(manifest: dict[str, Any] | None) -> set[str]:
    """The saved folders a manifest names."""
    if not manifest:
        return set()
    return {rel.split("/", 1)[0] for rel in manifest.get("files", {})}


def _key(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix.strip("/") else rel


def _errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped,unused-ignore]

    return (BotoCoreError, ClientError)


class Uploader:
    """Puts the checkpoint folder's each new state to S3 (see the module docstring)."""

    def __init__(
        self,
        directory: str,
        url: str,
        region: str | None = None,
        *,
        on_event: Callable[[str, dict[str, Any]], None] = lambda kind, info: None,
        poll_s: float = POLL_S,
    ) -> None:
        self.directory = directory
        self.url = url.rstrip("/") + "/"
        self.bucket, self.prefix = parse_src(self.url)
        self.region = region
        self.on_event = on_event
        self.poll_s = poll_s
        self._client: Any = None
        self._present: dict[str, int] | None = None  # key -> size, of what S3 holds
        self._previous: dict[str, Any] | None = None  # the manifest S3 held before the last put
        self.uploaded: bytes | None = None  # the manifest S3 holds now, as put
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="s3-checkpoints", daemon=True)
        self.error: str | None = None

    def start(self) -> Uploader:
        self.thread.start()
        return self

    def finish(self, timeout: float = FINAL_UPLOAD_S) -> None:
        """Stop the thread, then put the last checkpoint if S3 lacks it (within ``timeout``)."""
        self.stopping.set()
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.round()

    def _run(self) -> None:
        delay = self.poll_s
        while not self.stopping.wait(delay):
            delay = self.poll_s if self.round() else min(delay * 2, 15.0)

    def round(self) -> bool:
        """Upload the checkpoint if it changed since the last upload; False after a failure."""
        try:
            self.upload()
        except Invalid:  # saves that never held still for a snapshot: the next round tries again
            return True
        except Exception as e:  # never let S3 end the run: the next round tries again
            message = f"{type(e).__name__}: {e}"
            if message != self.error:
                self.error = message
                self.on_event("error", {"error": message})
            return False
        return True

    def upload(self) -> dict[str, Any] | None:
        """One upload of the folder's current checkpoint; its manifest, or None if S3 has it."""
        path = os.path.join(self.directory, MANIFEST)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if raw == self.uploaded:
            return None
        held = os.path.join(os.path.dirname(self.directory), f".s3-snapshot-{os.getpid()}")
        try:
            manifest = snapshot(self.directory, held)  # the latest save, held still for the upload
            if manifest is None:
                return None
            return self._upload(held, manifest)
        finally:
            shutil.rmtree(held, ignore_errors=True)

    def _upload(self, held: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
        with open(os.path.join(held, MANIFEST), "rb") as f:
            raw = f.read()
        if raw == self.uploaded:
            return None
        client = self._client = self._client or s3_client(self.region)
        present = self._inventory(client)
        for rel, meta in sorted(manifest["files"].items()):
            key = _key(self.prefix, rel)
            size = int(meta.get("size", -1))
            if present.get(key) == size:
                continue  # saved folders never change once named
            local = os.path.join(held, *rel.split("/"))
            if os.path.getsize(local) != size:
                raise Invalid(f"{rel} is not the size its manifest says")
            client.upload_file(local, self.bucket, key)
            present[key] = size
        client.put_object(Bucket=self.bucket, Key=_key(self.prefix, MANIFEST), Body=raw)
        keep = folders(manifest) | folders(self._previous)
        stale = [
            k
            for k in present
            if k != _key(self.prefix, MANIFEST)
            and k[len(self.prefix) :].lstrip("/").split("/", 1)[0] not in keep
        ]
        for start in range(0, len(stale), 1000):
            batch = stale[start : start + 1000]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch]})
        for k in stale:
            present.pop(k, None)
        self._previous, self.uploaded = manifest, raw
        if self.error is not None:
            self.error = None
        self.on_event(
            "uploaded", {"fit": manifest.get("fit"), "epoch": manifest.get("epoch"), "url": self.url}
        )
        return manifest

    def _inventory(self, client: Any) -> dict[str, int]:
        """What S3 holds under the run's prefix (listed once; kept up to date after)."""
        if self._present is None:
            found = {}
            for item in list_objects(client, self.bucket, self.prefix):
                found[item["Key"]] = int(item.get("Size", 0))
            self._present = found
            if _key(self.prefix, MANIFEST) in found:  # a relaunch: the last instance's manifest
                body = client.get_object(Bucket=self.bucket, Key=_key(self.prefix, MANIFEST))["Body"].read()
                try:
                    self._previous = json.loads(body.decode("utf-8"))
                except ValueError:
                    self._previous = None
        return self._present


def put_files(url: str, files: dict[str, str], region: str | None = None) -> int:
    """Put local files under ``url`` (``{relative key: local path}``); returns how many."""
    bucket, prefix = parse_src(url.rstrip("/") + "/")
    client = s3_client(region)
    for rel, path in sorted(files.items()):
        client.upload_file(path, bucket, _key(prefix, rel))
    return len(files)


def restore(url: str, directory: str, region: str | None = None) -> dict[str, Any]:
    """Bring S3's checkpoint into ``directory`` when it is further on than the one there.

    Returns ``{"source": "s3"|"local"|None, "fit", "epoch"}``: where the checkpoint training
    resumes from came from (None: there is none anywhere)."""
    bucket, prefix = parse_src(url.rstrip("/") + "/")
    try:
        local = read_manifest(directory)
    except Invalid:
        local = None
    client = s3_client(region)
    errors = _errors()
    try:
        try:
            raw = client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read()
        except errors as e:
            code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")
            if code not in ("NoSuchKey", "404"):
                raise
            raw = None
        remote = json.loads(raw.decode("utf-8")) if raw else None
        if remote is None or progress(remote) <= progress(local):
            source = "local" if local else None
            best = local
            return {"source": source, "fit": progress(best)[0], "epoch": progress(best)[1]}
        staging = directory.rstrip("/") + ".s3-incoming"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for rel, meta in sorted(remote["files"].items()):
            parts = rel.split("/")
            if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
                raise AgentError(
                    f"refusing checkpoint file {rel!r} from {url}", "The S3 manifest is damaged."
                )
            target = os.path.join(staging, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            client.download_file(bucket, _key(prefix, rel), target)
            if os.path.getsize(target) != meta.get("size") or sha256_file(target) != meta.get("sha256"):
                raise AgentError(
                    f"{url}{rel} does not match the checkpoint's manifest",
                    "The S3 checkpoint is damaged; training resumes from the controller's copy.",
                )
        with open(os.path.join(staging, MANIFEST), "wb") as f:
            f.write(raw)
    except errors as e:
        raise AgentError(
            f"reading the checkpoint in {url} failed: {e}",
            "The run's instance profile may read and write only its checkpoint prefix; check the bucket.",
        ) from None
    old = directory.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
    return {"source": "s3", "fit": progress(remote)[0], "epoch": progress(remote)[1]}
