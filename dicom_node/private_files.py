"""Files holding secrets (credentials, tokens, the relay's address): owner-only, no symlinks."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by the owner only, never through a symbolic link.

    The file is written next to its final name and renamed into place, so a reader sees the old
    or the new content, never a partial one.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover of a crash (unlink never follows a link)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def read_private_file(path: Path) -> str:
    """The content of a file written by :func:`write_private_file` (never through a symbolic link)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor) as handle:
        return handle.read().strip()


def create_secret(path: Path) -> bool:
    """Create the secret file (0600) unless it exists; True when it was created.

    Created with ``O_EXCL`` on its final name, so two processes starting together cannot
    end up with different secrets.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(SECRET_BYTES))
    return True
