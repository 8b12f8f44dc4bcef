"""Label Studio's API tokens, both kinds, and the one host each token may be sent to.

    auth = auth_for("http://ls:8080", token)             # one per (Label Studio, token) and process
    requests.get(url, headers=auth.headers_for(url))     # {} unless url is on Label Studio's origin
    resp = auth.request(session, "POST", url, json=...)  # the same, refreshing once on a 401
    on_origin("http://ls:8080", url)                     # True: the token may go there

Label Studio 1.23 hands users Personal Access Tokens by default: JWT *refresh* tokens. They are not
sent as such: `POST /api/token/refresh/` with {"refresh": <PAT>} answers {"access": <JWT>}, sent as
`Authorization: Bearer <access>` until it expires (minutes), then refreshed again. Legacy keys (40 hex
characters, accepted only with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true) go as `Token <key>`. The
kind is read from the token itself (a JWT's `token_type` claim), so users paste whichever they have.

A token is sent only to the origin (scheme, host, port) of the Label Studio it was given with: never
to another host a task or a redirect points to, never over http to an https Label Studio's host.
The access token is cached in the process and, when a Redis client is given, in Redis too: RQ runs
every job in a fresh fork, which would otherwise refresh once per job.

Imports nothing of backend/: the workers use it for upload fetches, the backend for posting.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from urllib.parse import urlsplit

import requests

REFRESH_PATH = "/api/token/refresh/"
#: An access token is refreshed this many seconds before its `exp`, so none expires in flight.
EXPIRY_MARGIN = 30.0
#: Without an `exp` claim, an access token is kept this long (Label Studio's default lifetime is 5 min).
DEFAULT_LIFETIME = 240.0
TIMEOUT = 30.0
REDIS_PREFIX = "subdisc:v1:ls-access:"


class AuthError(Exception):
    """No usable credentials: the refresh was refused (transient False) or could not be made."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def jwt_claims(token: str) -> dict | None:
    """A JWT's payload claims (unverified: only Label Studio can check them), or None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def token_kind(token: str) -> str:
    """"refresh" (a Personal Access Token), "access" (a JWT access token) or "legacy" (a `Token` key)."""
    claims = jwt_claims(token)
    if claims is None:
        return "legacy"
    return "access" if claims.get("token_type") == "access" else "refresh"


def origin(url: str | None) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None if it is not one."""
    if not url:
        return None
    try:
        p = urlsplit(url.strip())
        scheme = p.scheme.lower()
        port = p.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:      # a non-numeric or out-of-range port
        return None
    if scheme not in ("http", "https") or not p.hostname:
        return None
    return scheme, p.hostname.lower().rstrip("."), port


def on_origin(token_url: str | None, url: str | None) -> bool:
    """True if `url` is on the origin of `token_url` (the Label Studio a token came with)."""
    home = origin(token_url)
    return home is not None and origin(url) == home


class LabelStudioAuth:
    """Authorization headers for one Label Studio and one token (thread-safe)."""

    def __init__(self, url: str, token: str, redis=None, timeout: float = TIMEOUT):
        if origin(url) is None:
            raise ValueError(f"not an http(s) Label Studio URL: {url!r}")
        self.url, self.token, self.redis, self.timeout = url.rstrip("/"), token, redis, timeout
        self.kind = token_kind(token)
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self.refreshes = 0      # how many times this process asked for an access token

    # --- headers -----------------------------------------------------------------------------
    def headers(self) -> dict[str, str]:
        """{"Authorization": ...} for a request to this Label Studio (refreshing a PAT if due)."""
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.token}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self.token}"}
        return {"Authorization": f"Bearer {self._current_access()}"}

    def headers_for(self, url: str) -> dict[str, str]:
        """headers() if `url` is on this Label Studio's origin, else {} (the token stays home)."""
        return self.headers() if on_origin(self.url, url) else {}

    def invalidate(self, sent: dict | None = None) -> bool:
        """Forget the access token after a 401; True if a retry with a fresh one may pass.

        `sent`: the headers the refused request carried. If another thread has refreshed since,
        the cached token is newer than the refused one and is kept.
        """
        if self.kind != "refresh":
            return False
        with self._lock:
            refused = (sent or {}).get("Authorization", "").removeprefix("Bearer ")
            if not sent or refused == self._access:
                self._access, self._expires = None, 0.0
                if self.redis is not None:
                    self._redis_call("delete", self._redis_key())
        return True

    def request(self, session, method: str, url: str, **kwargs) -> requests.Response:
        """session.request(method, url, ...) with this token if url is on Label Studio's origin;
        a 401 with a PAT refreshes the access token and tries once more."""
        session = session or requests
        extra = kwargs.pop("headers", None) or {}
        for attempt in (0, 1):
            auth = self.headers_for(url)
            resp = session.request(method, url, headers={**extra, **auth}, **kwargs)
            if resp.status_code != 401 or attempt or not auth or not self.invalidate(auth):
                return resp
            resp.close()
        return resp

    # --- refresh -----------------------------------------------------------------------------
    def _current_access(self) -> str:
        now = time.time()
        if self._access and now < self._expires:
            return self._access
        with self._lock:
            if self._access and time.time() < self._expires:
                return self._access                 # another thread refreshed meanwhile
            shared = self._from_redis()
            if shared is not None:
                self._access, self._expires = shared
                return self._access
            access = self.refresh()
            self._access, self._expires = access, _expiry(access)
            self._to_redis(access, self._expires)
            return access

    def refresh(self) -> str:
        """A new access token for the PAT: POST /api/token/refresh/ {"refresh": PAT}."""
        endpoint = self.url + REFRESH_PATH
        self.refreshes += 1
        try:
            resp = requests.post(endpoint, json={"refresh": self.token}, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise AuthError(f"cannot reach Label Studio at {self.url} to refresh the access "
                            f"token: {type(exc).__name__}", transient=True) from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise AuthError(f"POST {endpoint}: HTTP {resp.status_code}, try again later",
                            transient=True)
        if resp.status_code >= 300:
            raise AuthError(f"Label Studio refused the Personal Access Token (POST {endpoint}: "
                            f"HTTP {resp.status_code} {resp.text[:200]}): revoked or expired? "
                            "Check LABEL_STUDIO_API_KEY")
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise AuthError(f"POST {endpoint} answered no access token: {resp.text[:200]}")
        return access

    # --- the cache shared by forked jobs -----------------------------------------------------
    def _redis_key(self) -> str:
        return REDIS_PREFIX + hashlib.sha256(f"{self.url}\n{self.token}".encode()).hexdigest()[:32]

    def _redis_call(self, name: str, *args):
        try:
            return getattr(self.redis, name)(*args)
        except Exception:    # the cache is an optimisation: without Redis, refresh in-process
            return None

    def _from_redis(self) -> tuple[str, float] | None:
        if self.redis is None:
            return None
        raw = self._redis_call("get", self._redis_key())
        if not raw:
            return None
        access = raw.decode() if isinstance(raw, bytes) else str(raw)
        expires = _expiry(access)
        return (access, expires) if time.time() < expires else None

    def _to_redis(self, access: str, expires: float) -> None:
        ttl = int(expires - time.time())
        if self.redis is not None and ttl > 0:
            self._redis_call("set", self._redis_key(), access, ttl)


def _expiry(access: str) -> float:
    """When to stop using an access token: its `exp` claim minus a margin."""
    claims = jwt_claims(access) or {}
    exp = claims.get("exp")
    if isinstance(exp, (int, float)):
        return float(exp) - EXPIRY_MARGIN
    return time.time() + DEFAULT_LIFETIME


_AUTHS: dict[tuple, LabelStudioAuth] = {}
_AUTHS_LOCK = threading.Lock()


def auth_for(url: str, token: str, redis=None) -> LabelStudioAuth:
    """The process's LabelStudioAuth for this Label Studio and token (its access token cached)."""
    key = (url.rstrip("/"), token)
    with _AUTHS_LOCK:
        auth = _AUTHS.get(key)
        if auth is None:
            if len(_AUTHS) > 64:
                _AUTHS.clear()
            auth = _AUTHS[key] = LabelStudioAuth(url, token, redis=redis)
        elif redis is not None and auth.redis is None:
            auth.redis = redis
        return auth


def headers_for(label_studio_url: str | None, token: str | None, url: str, redis=None) -> dict:
    """The Authorization header for a request to `url`: {} without a token or off its origin."""
    if not token or not on_origin(label_studio_url, url):
        return {}
    return auth_for(label_studio_url, token, redis).headers()
