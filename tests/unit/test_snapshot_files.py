"""The controller's snapshot store: files on its node, memory only when the disk refuses."""

from __future__ import annotations

from pathlib import Path

from kvray.actors.controller import SnapshotFiles


def test_snapshots_live_in_files_not_in_memory(tmp_path: Path) -> None:
    store = SnapshotFiles(tmp_path / "snaps", keep=False)
    assert store.on_disk and store.get(0) is None
    store.put(0, b"first")
    store.put(0, b"second")  # replaces the previous copy whole
    store.put(1, b"other")
    assert store.get(0) == b"second" and store.get(1) == b"other"
    assert store.in_memory_bytes() == 0
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
        "shard-0.snapshot",
        "shard-1.snapshot",
    ]


def test_a_restarted_controller_keeps_the_files_and_a_new_deployment_does_not(
    tmp_path: Path,
) -> None:
    SnapshotFiles(tmp_path, keep=False).put(3, b"held")
    assert SnapshotFiles(tmp_path, keep=True).get(3) == b"held"
    assert SnapshotFiles(tmp_path, keep=False).get(3) is None


def test_an_unwritable_directory_keeps_snapshots_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    store = SnapshotFiles(blocker / "snaps", keep=False)  # a file where a directory should be
    assert not store.on_disk
    store.put(0, b"kept")
    assert store.get(0) == b"kept" and store.in_memory_bytes() == 4


def test_a_failed_write_keeps_that_snapshot_in_memory(tmp_path: Path) -> None:
    store = SnapshotFiles(tmp_path / "snaps", keep=False)
    store.put(0, b"on disk")
    store.remove()  # the directory is gone: the next write fails
    store.put(1, b"in memory")
    assert store.get(1) == b"in memory" and store.in_memory_bytes() == 9
    assert store.get(0) is None
