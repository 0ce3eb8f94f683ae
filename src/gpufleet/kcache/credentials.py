"""Registry credentials from a docker ``config.json``.

`docker_credentials` finds a registry's ``auths`` entry by host (bare
``host:port``, URL, or any of Docker Hub's names) and decodes it into
`Credentials`. Credential helpers (``credsStore``, ``credHelpers``) are never
run: their presence comes back as a message for the auth error instead. See
docs/kcache-oci.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.reference import DOCKER_HUB_ALIASES

__all__ = ["Credentials", "docker_credentials"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password, and where they came from (named in auth errors)."""

    username: str
    password: str
    source: str


def _config_keys(registry: str) -> set[str]:
    # config.json keys come as bare hosts or URLs; Docker Hub also as its v1 index.
    if registry in DOCKER_HUB_ALIASES:
        return set(DOCKER_HUB_ALIASES)
    return {registry}


def _key_host(key: str) -> str:
    return key.split("://", 1)[-1].split("/", 1)[0]


def docker_credentials(registry: str, config: Path | None = None) -> Credentials | str | None:
    """Credentials for ``registry`` from a docker ``config.json``.

    ``config`` is the file or its directory; by default ``$DOCKER_CONFIG/config.json``
    or ``~/.docker/config.json``. Returns the credentials, ``None`` when the file
    has none for the registry, or a message when they live in a credential helper
    (which this client does not run).
    """
    if config is None:
        config = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    if config.is_dir():
        config = config / "config.json"
    if not config.is_file():
        return None
    try:
        document = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise KcacheError(f"cannot read docker config {config}: {exc}") from exc
    if not isinstance(document, dict):
        raise KcacheError(f"docker config {config} is not a JSON object")
    keys = _config_keys(registry)
    helpers = document.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _key_host(str(key)) in keys:
                return (
                    f"{config} keeps the credentials for {registry} in credential helper "
                    f"{helper!r} (credHelpers); helpers are not supported: pass a username "
                    "and password, or put them under 'auths'"
                )
    auths = document.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if _key_host(str(key)) not in keys or not isinstance(entry, dict):
                continue
            found = _auth_entry(entry, f"{config} auths[{key!r}]")
            if found is not None:
                return found
    store = document.get("credsStore")
    if isinstance(store, str) and store:
        return (
            f"{config} keeps registry credentials in credential store {store!r} (credsStore); "
            f"helpers are not supported: pass a username and password for {registry}, "
            "or put them under 'auths'"
        )
    return None


def _auth_entry(entry: dict[str, object], source: str) -> Credentials | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise KcacheError(f"{source}: 'auth' is not base64 of user:password") from exc
        if not sep:
            raise KcacheError(f"{source}: 'auth' is not base64 of user:password")
        return Credentials(username, password, source)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(user, secret, source)
    return None
