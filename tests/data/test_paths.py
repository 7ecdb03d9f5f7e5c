"""resolve_data_root: explicit argument, $NETCARVE_DATA, walking up to shared/data; error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from netcarve.data import get_dataset, resolve_data_root
from netcarve.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def test_explicit_dir_wins_over_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("NETCARVE_DATA", str(b))
    assert resolve_data_root(a) == a
    assert resolve_data_root(str(a)) == a
    assert resolve_data_root() == b


def test_missing_explicit_dir_or_env_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data_dir / --data-dir"):
        resolve_data_root(tmp_path / "missing")
    monkeypatch.setenv("NETCARVE_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="NETCARVE_DATA") as e:
        resolve_data_root()
    assert str(tmp_path / "gone") in str(e.value)


def test_walks_up_from_cwd_to_shared_data(tmp_path, monkeypatch, no_data_root):
    shared = tmp_path / "nowhere" / "shared" / "data"  # i.e. ../shared/data seen from the cwd
    shared.mkdir(parents=True)
    assert resolve_data_root() == shared


def test_nothing_found_names_every_place_tried(no_data_root):
    with pytest.raises(DataError) as e:
        resolve_data_root()
    msg = str(e.value)
    assert "NETCARVE_DATA" in msg and "--data-dir" in msg
    assert str(no_data_root / "shared" / "data") in msg  # cwd itself
    assert str(no_data_root.parent / "shared" / "data") in msg  # ../shared/data
    assert str(no_data_root.parent / "pkg" / "shared" / "data") in msg  # from the package location


def test_dataset_without_root_raises_data_error(no_data_root):
    with pytest.raises(DataError, match="--data-dir"):
        get_dataset("cifar10", "test")


def test_root_without_cifar_names_the_folders_looked_at(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("NETCARVE_DATA", str(root))
    with pytest.raises(DataError) as e:
        get_dataset("cifar10", "test")
    msg = str(e.value)
    assert str(root / "cifar10") in msg and str(root / "cifar-10-batches-py") in msg
    assert "$NETCARVE_DATA" in msg and "--data-dir" in msg


@pytest.mark.data
def test_finds_shared_data_next_to_the_repo(monkeypatch):
    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} (../shared/data next to the repo) is absent")
    monkeypatch.delenv("NETCARVE_DATA", raising=False)
    monkeypatch.chdir(REPO)
    assert resolve_data_root().resolve() == shared.resolve()
