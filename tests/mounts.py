"""Small real file systems for the disk-full and read-only tests: a tmpfs of a given size, mounted for the test
(visible to every process, Ray's workers included) and unmounted after. Mounting needs root (CAP_SYS_ADMIN);
elsewhere the tests that need one are skipped, saying why."""

import errno
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: str = "8m", read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system is full; returns it (delete it to free the space)."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        chunk = b"\0" * (64 << 10)
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    return ballast
                chunk = chunk[: len(chunk) // 2]
