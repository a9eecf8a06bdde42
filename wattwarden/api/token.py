"""The API's write token: ``<state-dir>/token``, created mode 0600 at first start.

A token that anyone else on the host can read, or one short enough to guess, is refused rather
than used: the message says how to fix it (``chmod 600``, or delete the file to have a new one
made), as ssh does for a private key with loose permissions.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

TOKEN_FILE = "token"
MIN_TOKEN_CHARS = 16


class TokenError(Exception):
    """The token file cannot be used; the message is one line naming it and the fix."""


def ensure_token(state_dir: Path) -> str:
    """Read the write token, creating it (mode 0600) at first start. Raises TokenError."""
    path = state_dir / TOKEN_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as e:
        raise TokenError(f"cannot create token file {path}: {e.strerror or e}") from e
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    fix = f"delete {path} to have a new token made"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"token file {path} is not a regular file; {fix}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise TokenError(
                f"token file {path} is readable by other users (mode {mode:04o}); "
                f"run chmod 600 {path}, or {fix}"
            )
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TokenError(f"cannot read token file {path}: {e.strerror or e}; {fix}") from e
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not text; {fix}") from None
    if not token:
        raise TokenError(f"token file {path} is empty; {fix}")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(
            f"token in {path} is too weak (fewer than {MIN_TOKEN_CHARS} characters, or "
            f"whitespace inside); {fix}, or write a longer one"
        )
    return token
