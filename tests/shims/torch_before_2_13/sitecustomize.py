"""Loaded by the launched test processes (on PYTHONPATH) after ../fsdp_on_cpu: torch 2.13's FSDP2 with the
grouped-unit forward hooks of earlier torch (2.11 was seen failing on an H100).

Before 2.13, a unit of several modules (accelerate's [final norm, LM head]) ran its pre-forward only when
none of its modules was still pending, and only backward cleared the pending set; 2.13 also completes a
unit whose module never ran (TRL's fused LM head skips `lm_head`) at the end of the root's forward.
"""

import os
import sys

from torch.autograd.graph import _MultiHandle
from torch.distributed.fsdp._fully_shard import _fsdp_state

sys.path.remove(os.path.dirname(__file__))
sys.modules.pop("sitecustomize", None)
import sitecustomize  # noqa: E402,F401  (the next one on the path: ../fsdp_on_cpu)


def _group_hooks_before_2_13(modules, pre_hook, post_hook, modules_to_run, *_):  # type: ignore[no-untyped-def]
    everyone = set(modules)

    def pre(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not modules_to_run:  # the first module of the unit to run
            modules_to_run.update(everyone)
            return pre_hook(*args, **kwargs)
        return None

    def post_for(module):  # type: ignore[no-untyped-def]
        def post(*args, **kwargs):  # type: ignore[no-untyped-def]
            modules_to_run.discard(module)
            return post_hook(*args, **kwargs) if not modules_to_run else None
        return post

    handles = [m.register_forward_pre_hook(pre, prepend=True, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(post_for(m), prepend=False, always_call=True) for m in modules]
    return _MultiHandle(tuple(handles))


_fsdp_state._register_group_forward_hooks = _group_hooks_before_2_13
_fsdp_state.FSDPState._force_complete_incomplete_states = lambda self, output: output
