"""Every external artifact `make test` and `make demo` need resolves against its registry today, from an empty
directory: a warm cache on one machine can no longer hide a source that vanished (oplora/artifacts.py)."""

import os

import pytest

from oplora import artifacts
from oplora.artifacts import ARTIFACTS, ArtifactUnavailable
from oplora.io import file_sha256


@pytest.mark.parametrize("name", [n for n, a in ARTIFACTS.items() if not a.optional])
def test_every_required_artifact_resolves_against_its_registry(name, tmp_path):
    where = artifacts.check(name, tmp_path)  # no cache, no user copy: what a fresh machine gets
    artifact = ARTIFACTS[name]
    if artifact.filename:
        assert file_sha256(tmp_path / artifact.filename) == artifact.sha256, where


def test_a_missing_artifact_names_every_place_tried_and_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPLORA_CACHE", str(tmp_path / "cache"))
    wrong = tmp_path / "bigbench-1.0.0.tar.gz"
    wrong.write_bytes(b"not the archive")
    monkeypatch.setenv("OPLORA_BIGBENCH_ARCHIVE", str(wrong))
    with pytest.raises(ArtifactUnavailable) as found:
        artifacts.path("bigbench")
    message = str(found.value)
    assert "bigbench==1.0.0" in message and ARTIFACTS["bigbench"].sha256 in message
    assert f"$OPLORA_BIGBENCH_ARCHIVE: {wrong}: sha256 {file_sha256(wrong)}, not the pinned" in message
    assert str(tmp_path / "cache" / "artifacts" / "bigbench-1.0.0.tar.gz") + ": not there" in message
    assert "pip download bigbench==1.0.0: exit 1" in message  # the registry was asked, and said no
    assert "export OPLORA_BIGBENCH_ARCHIVE=/path/to/bigbench-1.0.0.tar.gz" in message


def test_a_supplied_copy_is_used_and_a_cached_one_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("OPLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPLORA_WORDNET_DEB", raising=False)
    deb = artifacts.path("wordnet-base")  # from the registry into the cache
    assert deb == tmp_path / "cache" / "artifacts" / "wordnet-base_3.0-37_all.deb"
    assert file_sha256(deb) == ARTIFACTS["wordnet-base"].sha256
    copy = tmp_path / "mine.deb"
    copy.write_bytes(deb.read_bytes())
    monkeypatch.setenv("OPLORA_WORDNET_DEB", str(copy))
    assert artifacts.path("wordnet-base") == copy
    monkeypatch.delenv("OPLORA_WORDNET_DEB")
    with open(deb, "r+b") as f:  # a damaged cache entry is fetched again, never used
        f.seek(1000)
        f.write(b"\0" * 8)
    assert artifacts.path("wordnet-base") == deb and file_sha256(deb) == ARTIFACTS["wordnet-base"].sha256
    assert not [p for p in os.listdir(deb.parent) if p != deb.name]  # no temporary left behind
