"""What dsnb treats as a secret, and how it keeps one off screens, records, plans and logs.

A value of ``JobSpec.env`` (or ``ServeSpec.env``) is secret when

- it is wrapped in :class:`Secret`, whatever its name: ``env={"DB_URL": dsnb.Secret("postgres://...")}``;
- its name looks like a credential's: it contains ``TOKEN``, ``SECRET``, ``PASSW``, ``CREDENTIAL``,
  ``PRIVATE``, ``AUTH`` or ``APIKEY``, or has ``KEY``, ``PASS``, ``PWD`` or ``DSN`` as a word
  (``OPENAI_KEY``, ``WANDB_KEY``, ``SSH_KEY``, ``DB_PASS``), or is ``DATABASE_URL``;
- its value looks like one: a URL with ``user:password@``, or a token with a well-known prefix
  (``hf_``, ``sk-``, ``ghp_``, ``github_pat_``, ``glpat-``, ``xoxb-``, ``AKIA``..., a private key).

Secret values are shown as ``***`` in ``repr``, plans, exported YAML, records, widgets and error
messages; on Kubernetes they travel in a Secret of the job's. A :class:`SecretRef` names a key
of a Kubernetes Secret you already have: its value never passes through dsnb at all.

Example:
    >>> is_secret("OPENAI_KEY", "x"), is_secret("DB_URL", "postgres://app:hunter2@db/app"), is_secret("NCCL_DEBUG", "WARN")
    (True, True, False)
    >>> redact_env({"DB_URL": Secret("postgres://db/app"), "LOG": "info"})
    {'DB_URL': '***', 'LOG': 'info'}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

REDACTED = "***"

_SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|AUTH|API_?KEY|ACCESS_?KEY"
    r"|(?:^|_)(?:KEY|PASS|PWD|DSN)(?:_|$)|^DATABASE_URL$",
    re.IGNORECASE,
)
#: A config key that holds a credential: ``api_key``, ``token``, ``password``... (not ``tokenizer``).
_CONFIG_CREDENTIAL = re.compile(r"(?:^|_)(?:api_?key|token|password|passwd|secret|credentials?)$", re.IGNORECASE)
_URL_WITH_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.IGNORECASE)
_TOKEN = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,}|sk_(?:live|test)_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{16,}"
    r"|github_pat_[A-Za-z0-9_]{16,}|glpat-[A-Za-z0-9_-]{16,}|xox[abposr]-[A-Za-z0-9-]{8,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{30,})"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)


class Secret(str):
    """A value to keep secret whatever its name: it behaves as the string it wraps, but its
    ``repr`` is ``Secret('***')`` and dsnb keeps it out of everything it shows or stores.

    Example:
        >>> token = Secret("postgres://app:pw@db/app")
        >>> token, token.startswith("postgres")
        (Secret('***'), True)
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"


@dataclass(frozen=True)
class SecretRef:
    """A key of a Kubernetes Secret that already exists in the job's namespace, as an env value:
    the pods read it (``secretKeyRef``); dsnb never sees the value. Kubernetes backends only.

    Example:
        >>> SecretRef("db-credentials", "url").to_dict()
        {'secretKeyRef': {'name': 'db-credentials', 'key': 'url'}}
    """

    name: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"secretKeyRef": {"name": self.name, "key": self.key}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SecretRef:
        ref = data["secretKeyRef"]
        return cls(ref["name"], ref["key"])


def looks_like_credential(value: str) -> bool:
    """Whether a value looks like a credential by itself (a URL with a password, a known token)."""
    return bool(_URL_WITH_PASSWORD.search(value) or _TOKEN.search(value))


def is_secret(name: str, value: Any) -> bool:
    """Whether an env variable's value is to be kept secret (see the module docstring)."""
    if isinstance(value, SecretRef):
        return False  # nothing of it is secret: it only names where the secret is
    return isinstance(value, Secret) or bool(_SECRET_NAME.search(name)) or (isinstance(value, str) and looks_like_credential(value))


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``env`` with secret values shown as ``***`` (a :class:`SecretRef` as its reference)."""
    return {k: (v.to_dict() if isinstance(v, SecretRef) else REDACTED if is_secret(k, v) else v) for k, v in env.items()}


def credential_paths(config: Any, path: str = "") -> list[str]:
    """Dotted paths of a DeepSpeed config's values that are credentials (``comet.api_key``, a token...).

    Example:
        >>> credential_paths({"comet": {"enabled": True, "api_key": "abc"}, "wandb": {"project": "p"}})
        ['comet.api_key']
    """
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, (dict, list)):
                found += credential_paths(value, where)
            elif isinstance(value, str) and value and value != "auto" and (_CONFIG_CREDENTIAL.search(str(key)) or looks_like_credential(value)):
                found.append(where)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += credential_paths(value, f"{path}[{i}]")
    return found


def refuse_references(env: dict[str, Any], backend: str) -> None:
    """Refuse a :class:`SecretRef` on a backend that runs outside Kubernetes.

    Raises:
        InvalidSpecError: naming the variable, with the fix.
    """
    from dsnb.errors import InvalidSpecError

    for key, value in env.items():
        if isinstance(value, SecretRef):
            raise InvalidSpecError(f"env.{key}", f"SecretRef({value.name!r}, {value.key!r}) names a Kubernetes Secret, "
                                                 f"which the {backend} backend cannot read",
                                   "give the value itself as dsnb.Secret(...) here, or run on a Kubernetes backend")


def redact_text(text: str, values: tuple[str, ...] = ()) -> str:
    """``text`` with credential-looking parts and the given secret ``values`` shown as ``***``.

    Example:
        >>> redact_text("cannot reach postgres://app:hunter2@db:5432/app with hf_abcdefghijkl")
        'cannot reach postgres://app:***@db:5432/app with ***'
    """
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _URL_WITH_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _TOKEN.sub(REDACTED, text)
