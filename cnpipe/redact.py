"""Keep credentials written into a URL (https://user:password@host/...) out of what the pipeline writes.

The config becomes a kfp parameter (the compiled YAML, the pod spec, the stage's command line) and the
service URL goes into manifests, logs and error messages; so the config only ever holds the URL without
its user:password, and the credentials travel as CREDENTIALS_ENV (on Kubeflow, from a Kubernetes secret).
"""
from __future__ import annotations

import copy
import re
import urllib.parse

CREDENTIALS_ENV = "CNPIPE_RETRIEVAL_CREDENTIALS"  # "user:password" for retrieval.service_url (HTTP basic auth)

# scheme://userinfo@ ; userinfo runs to the authority's last "@" (as urllib.parse reads it)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s]*)@")


def split_credentials(url: str) -> tuple[str, str]:
    """(the URL without user:password@, "user:password" percent-decoded, or "" when it has none)."""
    match = _USERINFO.match(url)
    if not match:
        return url, ""
    user, colon, password = match.group(2).partition(":")
    credentials = urllib.parse.unquote(user) + (":" + urllib.parse.unquote(password) if colon else "")
    return match.group(1) + url[match.end():], credentials


def redact_url(text: str) -> str:
    """`text` with the user:password of every URL in it replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def scrub(text: str, secrets: list[str]) -> str:
    """redact_url, and every secret (a password a server echoed back, say) replaced by ***."""
    text = redact_url(text)
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def config_without_credentials(config):
    """(a copy of `config` whose retrieval.service_url holds no credentials, the credentials or "")."""
    url, credentials = split_credentials(config.retrieval.service_url)
    if not credentials:
        return config, ""
    config = copy.deepcopy(config)
    config.retrieval.service_url = url
    return config, credentials
