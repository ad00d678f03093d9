"""build_object runs make when the object is missing or older than its sources.

A stand-in source directory whose Makefile records each run and touches the object: the
decision is what is tested here; the real build is in test_bpf_program."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.datapath import loader

MAKEFILE = "cp_datapath.o: cp_datapath.c cp_maps.h\n\techo run >> runs.log\n\ttouch $@\n"


def _src(tmp_path: Path) -> Path:
    (tmp_path / "Makefile").write_text(MAKEFILE)
    for name in ("cp_datapath.c", "cp_maps.h"):
        (tmp_path / name).write_text("/* stand-in */\n")
    return tmp_path


def _runs(src: Path) -> int:
    log = src / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _age(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLANG", "true")  # present on PATH; our Makefile never calls it


def test_missing_then_fresh_then_stale(tmp_path: Path, tools: None) -> None:
    src = _src(tmp_path)
    obj = loader.build_object(src)
    assert obj == src / "cp_datapath.o" and obj.exists() and _runs(src) == 1
    assert loader.build_object(src) == obj and _runs(src) == 1  # up to date: no make
    _age(obj, 60)  # a source edited after the build
    assert loader.build_object(src) == obj and _runs(src) == 2
    assert loader.build_object(src, force=True) == obj and _runs(src) == 2  # make: up to date


def test_a_stale_object_is_used_where_the_tools_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _src(tmp_path)
    monkeypatch.setenv("CLANG", "true")
    obj = loader.build_object(src)
    _age(obj, 60)
    monkeypatch.setenv("CLANG", "no-such-clang-here")
    assert loader.build_object(src) == obj and _runs(src) == 1
    obj.unlink()
    with pytest.raises(loader.BpfUnavailableError, match="no-such-clang-here not installed"):
        loader.build_object(src)
