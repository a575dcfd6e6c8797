"""The student: a copy of the teacher that shares every weight it has not changed.

A pruned model differs from the original in a few layers only: the layer below each cut, where
the patch is folded, and the layers healing trains. A deep copy held every weight twice (SmolLM2:
540 MB more; Gemma-3-270M: 1.07 GB, most of it the 262K-row embedding; a 3B model: 12 GB), so the
student is made of new modules over the teacher's tensors, and a module gets tensors of its own
the first time something is about to change them in place (`own`). Whatever writes a student's
weights owns them first: the patch's fold, healing's trainable layers and LoRA's merge, a
checkpoint's weights loaded into it. A forgotten `own` would change the teacher too:
tests/test_student.py runs whole prunes (patched cuts, guarded and final healing, every kind of
trainable) and compares the teacher with its copy from before, bit for bit; tests/test_resume.py's
killed runs, resumed, end as the uninterrupted one.

Only plain tensors are shared: a sharded (--fsdp) student is built apart (shard.py) and a deep
copy of a student owns everything it holds.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

# The student parameters whose tensor is still the teacher's, by identity (a tensor's == is
# elementwise) and weakly (a discarded student drops out).
_SHARED = WeakIdKeyDictionary()


def student_of(teacher: nn.Module) -> nn.Module:
    """New modules over the teacher's weights: parameters are new objects (their flags and
    gradients are the student's) around the teacher's tensors; buffers are copied (small, and
    some models update theirs)."""
    memo: dict = {}
    for param in teacher.parameters():   # tied weights are one parameter, so they stay tied
        shared = nn.Parameter(param.data, requires_grad=param.requires_grad)
        memo[id(param)] = shared
        _SHARED[shared] = True
    return copy.deepcopy(teacher, memo)


def own(module: nn.Module) -> None:
    """Give `module`'s parameters tensors of their own where they still share the teacher's, before
    anything changes them in place. The parameter objects stay (an optimizer or a hook holding
    them keeps working)."""
    for param in module.parameters():
        if param in _SHARED:
            param.data = param.data.clone()
            del _SHARED[param]


def shares_teacher(module: nn.Module) -> bool:
    """Whether any of `module`'s parameters still holds the teacher's tensor."""
    return any(param in _SHARED for param in module.parameters())
