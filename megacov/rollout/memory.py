"""Peak resident memory of this process over a window of code (Linux ``VmHWM`` with a reset).

Why not sampling: a weight sync allocates and frees a bucket within milliseconds, which a sampling
thread misses. Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark to the
current RSS, so ``VmHWM`` read afterwards is the exact peak of the window. Shared memory that the
process touches (Ray's object store) counts too; :func:`rss_breakdown` tells the parts apart.
Where the reset is unavailable (not Linux, restricted /proc) the measurement reports ``None``.
"""
from __future__ import annotations

import re

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_breakdown() -> dict[str, int | None]:
    """Current ``anon`` (private), ``shmem`` (shared memory) and ``file`` resident bytes."""
    out = {}
    for key, field in (("anon", "RssAnon"), ("shmem", "RssShmem"), ("file", "RssFile")):
        kib = _status_kib(field)
        out[key] = None if kib is None else kib * 1024
    return out


class PeakRss:
    """``with PeakRss() as peak: ...``; then ``peak.extra_bytes`` = peak RSS in the window - RSS at entry."""

    def __init__(self) -> None:
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakRss:  # noqa: PYI034 - typing.Self needs Python 3.11
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return self
        rss = _status_kib("VmRSS")
        self.start_bytes = None if rss is None else rss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start_bytes is None:
            return
        hwm = _status_kib("VmHWM")
        self.peak_bytes = None if hwm is None else hwm * 1024

    @property
    def extra_bytes(self) -> int | None:
        if self.start_bytes is None or self.peak_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)
