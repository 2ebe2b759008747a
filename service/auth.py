"""Optional API keys (``CE_EVAL_API_KEYS``) and a per-key token-bucket rate limit.

Protocol-agnostic: HTTP middleware and gRPC interceptors call :meth:`Authenticator.authenticate`.
Keys are compared in constant time (``hmac.compare_digest``) against every configured key.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

from service.errors import Forbidden, RateLimited, Unauthenticated


def key_id(key: str) -> str:
    """Stable, non-secret id of a key (used to scope runs and label logs)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


#: Client addresses whose failed authentications are remembered (the oldest are forgotten).
MAX_TRACKED_ADDRESSES = 10_000


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``; one token per request."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def wait(self) -> float:
        """Seconds until a token is available (0.0: one is), taking none."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self) -> float:
        """0.0 if a token was taken, else the seconds until one is available."""
        wait = self.wait()
        if wait == 0.0:
            self.tokens -= 1.0
        return wait


class Authenticator:
    """Resolves a presented key to a principal id; None when auth is off."""

    def __init__(
        self,
        keys: list[str],
        rate_per_s: float = 0.0,
        burst: float = 0.0,
        failures_per_minute: float = 0.0,
    ) -> None:
        self.keys = [k.encode() for k in keys if k]
        self.rate_per_s = rate_per_s
        self.burst = burst or max(1.0, rate_per_s)
        self.failures_per_minute = failures_per_minute
        self._buckets: dict[str, TokenBucket] = {}
        self._failures: dict[str, TokenBucket] = {}  # per client address, oldest first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, presented: str | None, client: str | None = None) -> str | None:
        """→ principal id (None when auth is disabled); raises 401/403/429.

        ``client``: the caller's address. An address whose failed attempts used up its bucket
        (``failures_per_minute``, burst as many) gets 429 for every key until it refills, so a
        valid key cannot be told from an invalid one while throttled.
        """
        if not self.enabled:
            return None
        if client is not None:
            self._refuse_throttled(client)
        if not presented:
            raise Unauthenticated(
                "an API key is required (Authorization: Bearer <key> or X-API-Key)",
                [
                    {
                        "loc": ["header", "authorization"],
                        "msg": "missing API key",
                        "type": "missing_api_key",
                    }
                ],
                headers={"WWW-Authenticate": "Bearer"},
            )
        candidate = presented.encode()
        matched = False
        for key in self.keys:  # compare with every key: time does not depend on which matched
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            if client is not None:
                self._count_failure(client)
            raise Forbidden(
                "the API key is not valid",
                [
                    {
                        "loc": ["header", "authorization"],
                        "msg": "invalid API key",
                        "type": "invalid_api_key",
                    }
                ],
            )
        principal = key_id(presented)
        self._rate_limit(principal)
        return principal

    def _refuse_throttled(self, client: str) -> None:
        with self._lock:
            bucket = self._failures.get(client)
            wait = 0.0 if bucket is None else bucket.wait()
        if wait > 0:
            raise RateLimited(
                "too many failed authentications from this address",
                [
                    {
                        "loc": ["header", "authorization"],
                        "msg": "throttled",
                        "type": "auth_throttled",
                    }
                ],
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )

    def _count_failure(self, client: str) -> None:
        if self.failures_per_minute <= 0:
            return
        with self._lock:
            bucket = self._failures.pop(client, None)
            if bucket is None:
                burst = max(1.0, self.failures_per_minute)
                bucket = TokenBucket(self.failures_per_minute / 60, burst)
            bucket.take()
            self._failures[client] = bucket  # most recent last
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                del self._failures[next(iter(self._failures))]

    def _rate_limit(self, principal: str) -> None:
        if self.rate_per_s <= 0:
            return
        with self._lock:
            bucket = self._buckets.setdefault(principal, TokenBucket(self.rate_per_s, self.burst))
            wait = bucket.take()
        if wait > 0:
            raise RateLimited(
                f"rate limit of {self.rate_per_s:g} requests/s exceeded for this key",
                [
                    {
                        "loc": ["header", "authorization"],
                        "msg": "rate limited",
                        "type": "rate_limited",
                    }
                ],
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None
