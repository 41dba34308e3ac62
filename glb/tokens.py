"""Admin API credentials: scoped bearer tokens, and the secret files they come from.

The director reads ``admin.tokens_file`` at start and on SIGHUP: one token per
line, ``NAME SCOPE TOKEN``, ``#`` comments and blank lines ignored::

    # name      scope    token (>= 16 characters, no spaces)
    alice       operate  6b1f0c...
    grafana     read     9d4e22...

``NAME`` is who the director logs and records with every action (so one
token per person or robot, not one shared by everyone); ``SCOPE`` is ``read``
(``/status`` on the admin listener) or ``operate`` (also drain, undrain,
weight). A secret file readable or writable by "other" is refused: a token
anyone on the host can read proves nothing about who used it.

``parse_tokens`` and ``Tokens.authenticate`` are pure (text in, a token or
None out); ``read_secret`` is the one place that opens a secret file.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from glb.errors import AdminError

READ = "read"
OPERATE = "operate"
SCOPES: dict[str, frozenset[str]] = {
    READ: frozenset({READ}),
    OPERATE: frozenset({READ, OPERATE}),
}
"""What each scope may do: an operate token may also read."""

MIN_TOKEN = 16
SHARED_NAME = "shared-token"
"""The name the single legacy ``admin.token`` is logged under."""

_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    scope: str
    secret: bytes

    def __repr__(self) -> str:  # never the secret, not even in a traceback
        return f"Token({self.name!r}, {self.scope!r})"

    def allows(self, need: str) -> bool:
        return need in SCOPES[self.scope]


class Tokens:
    """The tokens a director accepts."""

    def __init__(self, tokens: tuple[Token, ...] = ()):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def authenticate(self, header: str | None) -> Token | None:
        """The token an ``Authorization: Bearer ...`` header carries, or None.

        Every configured token is compared, in constant time each, whatever
        matched: how long a refusal takes says nothing about which token came
        close. The caller answers every None with the same 401.
        """
        scheme, _, value = (header or "").partition(" ")
        given = value.strip().encode()
        found = None
        for token in self.tokens:
            if hmac.compare_digest(given, token.secret) and found is None:
                found = token
        return found if scheme.lower() == "bearer" and given else None


def parse_tokens(text: str, source: str) -> Tokens:
    """``NAME SCOPE TOKEN`` lines -> Tokens; AdminError naming file and line otherwise."""
    tokens: list[Token] = []
    names: set[str] = set()
    secrets: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        parts = line.split()
        if len(parts) != 3:
            raise AdminError(f"{where}: expected NAME SCOPE TOKEN, got {len(parts)} fields")
        name, scope, secret = parts
        if not _NAME.fullmatch(name):
            raise AdminError(f"{where}: bad token name {name!r} (letters, digits, _.@+-)")
        if scope not in SCOPES:
            raise AdminError(f"{where}: unknown scope {scope!r} (scopes: {', '.join(SCOPES)})")
        if len(secret) < MIN_TOKEN:
            raise AdminError(f"{where}: token of {name} is shorter than {MIN_TOKEN} characters")
        if name in names:
            raise AdminError(f"{where}: token name {name} is given twice")
        if secret.encode() in secrets:
            raise AdminError(f"{where}: the token of {name} is also another name's: one token, one name")
        names.add(name)
        secrets.add(secret.encode())
        tokens.append(Token(name, scope, secret.encode()))
    if not tokens:
        raise AdminError(f"{source}: no tokens (lines NAME SCOPE TOKEN)")
    return Tokens(tuple(tokens))


def read_secret(path: str | os.PathLike[str], what: str) -> str:
    """The text of a secret file; AdminError if it is missing, unreadable, or open to "other"."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                raise AdminError(f"{what} {str(p)!r} is accessible to every user on this host "
                                 f"(mode {stat.S_IMODE(mode):04o}): chmod o-rwx it")
            return f.read()
    except FileNotFoundError:
        raise AdminError(f"{what} {str(p)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdminError(f"{what} {str(p)!r}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def load_tokens(tokens_file: str | None, shared: str | None) -> Tokens:
    """The director's tokens: ``admin.tokens_file``'s, plus the legacy shared ``admin.token``."""
    tokens: tuple[Token, ...] = ()
    if tokens_file is not None:
        tokens = parse_tokens(read_secret(tokens_file, "admin.tokens_file"), tokens_file).tokens
    if shared is not None:
        tokens += (Token(SHARED_NAME, OPERATE, shared.encode()),)
    return Tokens(tokens)
