"""The process group's teardown: nothing may keep a gloo group alive until interpreter exit."""
import gc
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from charlm.runtime import destroy_process_group


def test_destroying_the_group_frees_a_ddp_model_held_by_a_reference_cycle(tmp_path):
    """A DDP model (and the group its reducer holds) that only a reference cycle keeps alive is freed by the
    teardown, not at interpreter exit. DDP forms such cycles itself in a fresh interpreter (its first
    instance), and a trainer's objects can; here the cycle is built on purpose so that the test does not
    depend on DDP's internals."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    gc.disable()  # the cycle must survive until the teardown, not be collected by chance before it
    try:
        model = DDP(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        alive = weakref.ref(model)
        cycle = [model]
        cycle.append(cycle)
        del model, cycle
        assert alive() is not None
        destroy_process_group()
        assert alive() is None
        assert not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
