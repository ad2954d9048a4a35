"""The spool's durability contract, as far as one machine can test it: fsync of the
file before the rename, fsync of the directory after it, nothing partial visible,
and — for a spool shared by several nodes — each node's own ``tmp/<name>/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node import spool as spool_module
from node.spool import Spool


def test_write_fsyncs_file_then_renames_then_fsyncs_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = Spool(tmp_path / "spool")
    target = sp.path("incoming", "1.2.3", "1.2.3.4")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    monkeypatch.setattr(spool_module.os, "replace", replace)
    sp.write(target, b"DICM" * 100)
    kinds = [e[0] for e in events]
    rename_at = kinds.index("rename")
    assert any(k == "fsync" and p.endswith(".part") for k, p in events[:rename_at]), \
        "file not fsynced before the rename"
    assert ("fsync", str(target.parent)) in events[rename_at:], "directory not fsynced after"
    assert target.read_bytes() == b"DICM" * 100
    assert list(sp.tmp.iterdir()) == []


def test_each_node_empties_only_its_own_tmp(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    a = Spool(root, node_name="node-a")
    b = Spool(root, node_name="node-b")
    assert a.tmp == root / "tmp" / "node-a" and b.tmp == root / "tmp" / "node-b"
    partial = a.tmp / "in-flight.part"  # node a is writing this right now
    partial.write_bytes(b"half")
    Spool(root, node_name="node-b")  # node b restarts
    assert partial.exists(), "a restarting node deleted a live neighbour's partial write"
    Spool(root)  # a single-node spool on the same root leaves the per-node dirs alone
    assert partial.exists()
    Spool(root, node_name="node-a")  # node a itself restarts: its leftovers go
    assert not partial.exists()


def test_study_directory_removed_by_another_node_mid_write_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = Spool(tmp_path / "spool", node_name="node-a")
    target = sp.path("outbox", "1.2.3", "1.2.3.5")
    target.parent.mkdir(parents=True)
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src: str | Path, dst: str | Path) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # node b removes the (empty) study directory just now
            Path(dst).parent.rmdir()
        real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "replace", replace)
    sp.write(target, b"result")
    assert calls["n"] == 2 and target.read_bytes() == b"result"
    assert list(sp.tmp.iterdir()) == []
