"""LoopGuard's checkpoints (torch.distributed.checkpoint) in one process: a round trip, and inspect's line."""

import pytest
import torch

from lossguard import load_checkpoint
from lossguard.inspection import CheckpointError, inspect_checkpoint, inspect_path
from lossguard.integrations.loop_checkpoint import save_checkpoint


def _trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_without_a_process_group_and_inspect_says_what_it_is(tmp_path):
    model, opt = _trained(0)
    path = save_checkpoint(tmp_path / "lossguard-fallback-3", model, opt, guard_state={"global_step": 3},
                           note={"step": 3, "message": "held"})
    fresh, fresh_opt = _trained(1)
    assert load_checkpoint(path, fresh, fresh_opt) == {"global_step": 3}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert all(torch.equal(opt.state[p][k], fresh_opt.state[q][k]) for k in opt.state[p])
    with pytest.raises(CheckpointError, match="a torch.distributed.checkpoint .* lossguard.load_checkpoint"):
        inspect_path(path)
    assert "torch.distributed.checkpoint" in inspect_checkpoint(path).problems[0]
