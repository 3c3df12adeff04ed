"""Process memory settings."""

import ctypes
import platform

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for threads created from now on. Each thread that allocates
    gets an arena of its own (up to 8 per core), and an arena keeps much of what its thread
    freed: the web process's upload parts in flight on executor threads left it larger than
    two arenas do. False where the C library is not glibc (nothing to do there)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
