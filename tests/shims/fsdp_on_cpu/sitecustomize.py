"""Loaded by the launched test processes (on PYTHONPATH): let accelerate run FSDP on CPU.

torch's FSDP2 runs on CPU over gloo, but accelerate (1.15) takes the FSDP plugin only when the processes
use accelerators and otherwise runs plain DDP. This does for CPU processes what AcceleratorState.__init__
does for GPU ones: the distributed type becomes FSDP, with the plugin and its mixed precision.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
