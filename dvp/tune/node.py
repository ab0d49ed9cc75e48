"""What every process of a sweep's Ray job does first, on whichever node it starts: Ray's
`worker_process_setup_hook` (`dvp.tune.sweep.RUNTIME_ENV`). Light on purpose: it runs in every Ray worker
process, before and whether or not it imports torch."""
from __future__ import annotations

import os

from dvp.parallel.interface import use_interface_of
from dvp.parallel.launch import nccl_error_settings


def setup_process() -> None:
    """gloo and NCCL talk over the interface of this node's Ray address, which the other nodes reach. Ray Train
    creates a trial's process group before `dvp.tune.worker.train_worker` runs, and gloo would otherwise listen
    on the address the host's own name resolves to, which may be a network the other nodes do not reach (a
    management network, Debian's 127.0.1.1): the group then never forms. GLOO_SOCKET_IFNAME and
    NCCL_SOCKET_IFNAME set where Ray starts are honoured. For the same reason NCCL's error handling is set here
    (`nccl_error_settings`, where unset): a lost worker raises in the survivors instead of aborting them."""
    import ray
    use_interface_of(ray.util.get_node_ip_address())
    os.environ.update(nccl_error_settings(os.environ))
