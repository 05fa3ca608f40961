"""Where each rank spills its snapshots: its own folder, configured or default."""

from pathlib import Path

from lossguard.integrations import dist


def test_each_rank_spills_into_its_own_folder(tmp_path, monkeypatch):
    assert dist.snapshot_folder(None, tmp_path / "lossguard") == tmp_path / "lossguard" / "snapshots"
    assert dist.snapshot_folder(str(tmp_path / "scratch"), tmp_path / "lossguard") == tmp_path / "scratch"
    assert dist.snapshot_folder(None, None) is None
    monkeypatch.setattr(dist, "rank", lambda: 3)  # what torch.distributed says on the fourth process
    assert dist.snapshot_folder(None, tmp_path / "lossguard") == tmp_path / "lossguard" / "snapshots-rank3"
    # a configured folder is per rank too: one shared folder let ranks delete each other's snapshots
    assert dist.snapshot_folder("/scratch/snaps", None) == Path("/scratch/snaps-rank3")
