"""Small helpers shared by the models and the scripts.

Every distributed helper here is safe to call without a process group: with one process the
gathers return their input, the world size is 1 and the rank is 0.
"""
import torch
import torch.distributed as dist


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather `tensor` from every rank and concatenate on dim 0 in rank order (no gradient)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)
