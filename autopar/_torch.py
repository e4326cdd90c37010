"""Private PyTorch names autopar depends on, each wrapped once with the versions it was
checked against. Public APIs come first; a name here is one that has no public equivalent."""

from __future__ import annotations

import torch.distributed as dist


def default_store() -> dist.Store:
    """The key-value store of the default process group: the one ``init_process_group``
    rendezvoused through, which every rank of the group reaches, with the group's timeout as
    its own.

    torch.distributed has no public accessor for it; ``distributed_c10d._get_default_store``
    is what its own helpers use. Checked against torch 2.13; the name and its meaning are the
    same in the torch 1.x and 2.x sources.
    """
    return dist.distributed_c10d._get_default_store()
