"""The process group's teardown: nothing may keep a gloo group alive until interpreter exit."""
import gc
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from charlm.runtime import destroy_process_group


def test_destroying_the_group_frees_a_dropped_ddp_model(tmp_path):
    """DDP sits in a reference cycle: dropping the last name does not free it (nor the group its reducer
    holds) until the cycle collector runs; destroy_process_group runs it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    gc.disable()  # the cycle must survive until the teardown, not be collected by chance before it
    try:
        model = DDP(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        alive = weakref.ref(model)
        del model
        assert alive() is not None, "DDP is no longer in a cycle: the teardown's gc.collect() may be unneeded"
        destroy_process_group()
        assert alive() is None
        assert not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
