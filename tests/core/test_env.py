"""HF_HUB_OFFLINE is read one way: by the checkpoint loader and by the hub push alike."""

from __future__ import annotations

import pytest

from vlmforge.core.env import hub_offline
from vlmforge.core.errors import ArtifactError, CheckpointError
from vlmforge.release.hub import check_hub_reachable
from vlmforge.source import resolve_checkpoint


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), (" YES ", True), ("On", True),
                                            ("0", False), ("", False), ("false", False), ("no", False)])
def test_hub_offline_reads_the_switch_as_huggingface_hub_does(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_hub_offline_is_false_when_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_offline() is False


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_the_loader_and_the_hub_push_agree_on_offline(monkeypatch, tmp_path, value):
    """Both refuse before any network call, whichever spelling of 'on' is set (the loader once took only '1')."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.chdir(tmp_path)  # `someone/model` must not exist as a local folder
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        resolve_checkpoint("someone/model", None, tmp_path / "cache", "model.checkpoint")
    with pytest.raises(ArtifactError, match="HF_HUB_OFFLINE is set"):
        check_hub_reachable("someone/model")
