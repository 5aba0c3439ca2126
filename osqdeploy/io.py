"""File-system failures in words: the one place an OSError becomes a reason a user can act on."""

from __future__ import annotations

import errno

__all__ = ["os_reason"]

_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f)",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "no such file or folder",
    errno.ELOOP: "too many symbolic links",
    errno.EIO: "input/output error",
}


def os_reason(e: OSError) -> str:
    """A short lower-case reason for an OSError (its ``strerror`` for an errno without words here)."""
    return _REASONS.get(e.errno, (e.strerror or type(e).__name__).lower())
