"""lpconvert's cache folder: LPCONVERT_CACHE, else the XDG base directory, else ~/.cache/lpconvert."""

from pathlib import Path

from lpconvert.data.archives import cache_root


def test_the_cache_follows_lpconvert_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LPCONVERT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lpconvert"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lpconvert"
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own" and cache_root(tmp_path / "given") == tmp_path / "given"
