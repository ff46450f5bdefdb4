"""A small IMDSv2 client: is a spot interruption or a rebalance recommendation scheduled?

EC2's instance metadata service (IMDSv2) wants a session token first: `PUT
/latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..21600`, then every
GET carries `X-aws-ec2-metadata-token`. A 401 means the token is missing, invalid or
expired: fetch a new one and retry once. `GET /latest/meta-data/spot/instance-action`
is 404 until EC2 schedules an interruption, then `{"action": "terminate"|"stop"|
"hibernate", "time": "2026-11-28T12:02:00Z"}`; `.../events/recommendations/rebalance`
is 404 until EC2 recommends a rebalance, then `{"noticeTime": "..."}`.

A connection error, a timeout or an unexpected status is "unknown", never "no
notice": `poll()` says so in its `error`. The endpoint is `$CLOUDTRAIN_IMDS_ENDPOINT`
(the simulated host's IMDS in a dry-run), default http://169.254.169.254; `off`
turns the client off. Requests never go through a proxy.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

ENDPOINT_ENV = "CLOUDTRAIN_IMDS_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
MAX_TTL_S = 21600


class ImdsUnavailable(Exception):
    """IMDS did not answer, or answered something other than the data or a 404."""


def endpoint_from_env() -> str | None:
    """The configured endpoint (no trailing slash), or None when it is turned off."""
    value = os.environ.get(ENDPOINT_ENV, "").strip()
    if value.lower() == "off":
        return None
    return (value or DEFAULT_ENDPOINT).rstrip("/")


class Poll:
    """One look at IMDS: what is scheduled, and whether the look worked.

    `instance_action` and `rebalance` are the parsed JSON bodies, or None when IMDS said
    404 (nothing scheduled) *or* when it could not be asked; `error` is None only when
    every question got an answer. A notice that was seen is real even when `error` is set.
    """

    def __init__(
        self,
        instance_action: dict[str, Any] | None = None,
        rebalance: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        self.instance_action = instance_action
        self.rebalance = rebalance
        self.error = error

    @property
    def known(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"instance_action": self.instance_action, "rebalance": self.rebalance, "error": self.error}

    def __repr__(self) -> str:
        return f"Poll({self.to_json()!r})"


class ImdsClient:
    """IMDSv2 with a cached token (renewed shortly before its TTL) and short timeouts."""

    def __init__(self, endpoint: str | None = None, ttl_s: int = MAX_TTL_S, timeout_s: float = 2.0) -> None:
        if endpoint is None:
            endpoint = endpoint_from_env() or DEFAULT_ENDPOINT
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"token TTL must be 1..{MAX_TTL_S} seconds, not {ttl_s}")
        self.endpoint = endpoint.rstrip("/")
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_until = 0.0  # time.monotonic() after which the token is renewed
        # IMDS is link-local: never through $http_proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- the token ---------------------------------------------------------------------

    def token(self) -> str:
        """A session token: the cached one while it has a margin of life left, else a new one."""
        now = time.monotonic()
        if self._token is not None and now < self._token_until:
            return self._token
        request = urllib.request.Request(
            self.endpoint + TOKEN_PATH, data=b"", method="PUT", headers={TTL_HEADER: str(self.ttl_s)}
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                token = str(response.read().decode("ascii", "replace")).strip()
        except urllib.error.HTTPError as e:
            e.close()
            raise ImdsUnavailable(f"token request: HTTP {e.code}") from None
        except (OSError, ValueError) as e:  # URLError, refused, timeout, a bad status line
            raise ImdsUnavailable(f"token request: {_reason(e)}") from None
        if not token:
            raise ImdsUnavailable("token request: an empty token")
        margin = min(60.0, self.ttl_s / 4.0)
        self._token, self._token_until = token, now + self.ttl_s - margin
        return token

    def forget_token(self) -> None:
        self._token, self._token_until = None, 0.0

    # --- reading -------------------------------------------------------------------------

    def get(self, path: str) -> str | None:
        """The text at `path`, or None on 404; a 401 renews the token and retries once.

        Raises ImdsUnavailable for anything else (no answer, a timeout, another status).
        """
        for attempt in (1, 2):
            request = urllib.request.Request(self.endpoint + path, headers={TOKEN_HEADER: self.token()})
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return str(response.read().decode("utf-8", "replace"))
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 1:
                    self.forget_token()  # expired or unknown to IMDS: a new one, once
                    continue
                raise ImdsUnavailable(f"GET {path}: HTTP {e.code}") from None
            except (OSError, ValueError) as e:
                raise ImdsUnavailable(f"GET {path}: {_reason(e)}") from None
        raise ImdsUnavailable(f"GET {path}: HTTP 401 with a fresh token")  # pragma: no cover

    def get_json(self, path: str) -> dict[str, Any] | None:
        """The JSON object at `path`, or None on 404."""
        text = self.get(path)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            raise ImdsUnavailable(f"GET {path}: not JSON: {text[:200]!r}") from None
        if not isinstance(obj, dict):
            raise ImdsUnavailable(f"GET {path}: not a JSON object: {text[:200]!r}")
        return obj

    def instance_id(self) -> str:
        text = self.get(INSTANCE_ID_PATH)
        if not text:
            raise ImdsUnavailable("no instance-id")
        return text.strip()

    def poll(self) -> Poll:
        """What is scheduled now: the spot instance-action and the rebalance recommendation."""
        result = Poll()
        errors = []
        for attr, path in (("instance_action", INSTANCE_ACTION_PATH), ("rebalance", REBALANCE_PATH)):
            try:
                setattr(result, attr, self.get_json(path))
            except ImdsUnavailable as e:
                errors.append(str(e))
                if "token request" in str(e):
                    break  # no token: the second question would fail the same way
        if errors:
            result.error = "; ".join(errors)
        return result


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        reason = error.reason
        if isinstance(reason, socket.timeout):
            return "timed out"
        return str(reason)
    if isinstance(error, socket.timeout):
        return "timed out"
    return f"{type(error).__name__}: {error}"


# --- what a poll means for the run ---------------------------------------------------------

SPOT = "spot-interruption"
REBALANCE = "rebalance"


def notice_from_poll(poll: Poll, current: dict[str, Any] | None, seen_at: str) -> dict[str, Any] | None:
    """The notice to record after `poll`, or None when `current` (the recorded one) stands.

    A notice is `{"kind": "spot-interruption"|"rebalance", "action", "time", "seen_at"}`:
    for a spot interruption `action` and `time` are IMDS's (the time the instance is
    acted on); for a rebalance recommendation `action` is null and `time` its noticeTime.
    A spot notice supersedes a rebalance recommendation, never the other way round; the
    same notice seen again is not recorded again.
    """
    if poll.instance_action is not None:
        candidate = {
            "kind": SPOT,
            "action": _text(poll.instance_action.get("action")),
            "time": _text(poll.instance_action.get("time")),
        }
    elif poll.rebalance is not None:
        candidate = {"kind": REBALANCE, "action": None, "time": _text(poll.rebalance.get("noticeTime"))}
    else:
        return None
    if current is not None:
        if current.get("kind") == SPOT and candidate["kind"] == REBALANCE:
            return None
        if all(current.get(key) == value for key, value in candidate.items()):
            return None
    candidate["seen_at"] = seen_at
    return candidate


def _text(value: object) -> str | None:
    return None if value is None else str(value)
