"""Hand freed heap memory back to the operating system (chunked generation, data checks)."""


def _libc_malloc_trim():
    """The C library's ``malloc_trim`` (glibc; ``None`` elsewhere)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Give freed per-chunk buffers back to the OS.

    Chunked loops allocate and free tens of MB per chunk; glibc keeps such blocks on its heap
    (its mmap threshold grows after the first frees), and the fragmented heap grew to 3.5 GB
    over a 1M-cell generation request before this call (``benchmarks/results_generation.md``).
    A no-op where the C library has no ``malloc_trim``.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
