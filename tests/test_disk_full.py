"""A full disk: the sweep stops once, with one line, and the same command finishes it.

Fast: the detection (an OSError ENOSPC, tensorstore's RESOURCE_EXHAUSTED text, a chained one).
Slow: the real CLI writing into a 2 MB tmpfs (``mount -t tmpfs``, needs root; skipped with the
reason where it cannot mount): it stops with "no space left at <sweep>; free space and rerun
the same command" (exit 74), no cell is marked failed, no ``*.orbax-checkpoint-tmp`` folder
is left, the log is a few lines (no orbax tracebacks); after the tmpfs is grown, the same
command completes and equals an uninterrupted run byte for byte.
"""
import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from dreamjax import files
from tests.helpers import assert_complete_and_identical, cli


def test_disk_full_is_recognised_in_every_form():
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write 100 bytes to '
                                         "file 12: No space left on device [os_error_code='28']"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as e:
        assert files.is_disk_full(e)
    assert not files.is_disk_full(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GB"))
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert str(files.DiskFull("/x/sw")) == "no space left at /x/sw; free space and rerun the same command"


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``where``; returns why not, or None."""
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"dreamjax-test-{uuid.uuid4().hex[:8]}",
                        str(where)], capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exited {p.returncode}")


@pytest.mark.slow
def test_full_disk_stops_once_and_the_same_command_finishes(reference, tmp_path):
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "2m")
    if why:
        pytest.skip(f"cannot mount a small tmpfs to fill ({why}); needs root")
    try:
        sw = disk / "sw"
        p = cli(sw, check=False)
        out = p.stdout + p.stderr
        assert p.returncode == 74, (p.returncode, out[-3000:])
        assert out.count("no space left at") == 1 and f"no space left at {sw}; free space and rerun the same " \
            "command" in out, out[-3000:]
        lines = [line for line in out.splitlines() if "cell-step" not in line]
        assert len(lines) < 30 and "[absl]" not in out and "RESOURCE_EXHAUSTED" not in out, out[-5000:]
        statuses = [json.loads(r.read_text())["status"] for r in sw.rglob("cell.json")]
        assert all(s == "done" for s in statuses), statuses  # nothing marked failed
        assert not [q for q in sw.rglob("*") if "orbax-checkpoint-tmp" in q.name]

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        p = cli(sw)
        assert_complete_and_identical(reference, sw)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
