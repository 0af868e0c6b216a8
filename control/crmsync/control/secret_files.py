"""Files under .local/ that hold a secret: created 0600 without following links, refused when
anyone but the owner could read them, in a .local/ only the owner may enter."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class SecretFileError(OSError):
    """A secret file is a link, not a regular file, or readable by others: it is not used."""


def private_dir(path: Path) -> Path:
    """`path` (e.g. .local/) created if missing and made 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def write_secret(path: Path, text: str, *, private: Path | None = None) -> None:
    """Writes `text` to `path`, mode 0600 even when the file existed with another mode; a
    symbolic link at `path` is refused (O_NOFOLLOW), not followed."""
    private_dir(private or path.parent)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError as error:
        raise SecretFileError(f"{path}: not written ({error.strerror}); is it a link?") from None
    with os.fdopen(descriptor, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def read_secret(path: Path) -> str | None:
    """The text of `path`, None when it does not exist; refused when `path` is a link, not a
    regular file, not ours, or open to group or others (mode checked before reading)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SecretFileError(f"{path}: not read ({error.strerror}); is it a link?") from None
    with contextlib.closing(os.fdopen(descriptor)) as source:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{path}: not a regular file")
        if info.st_uid != os.getuid():
            raise SecretFileError(f"{path}: owned by uid {info.st_uid}, not by this user")
        if info.st_mode & 0o077:
            raise SecretFileError(
                f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; "
                f"run `chmod 600 {path}` (or delete it for a new token)"
            )
        return source.read()
