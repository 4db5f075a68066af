"""Test-only hooks a test can ask a run to call, by name, in every process of the run.

Production code never calls these on its own: a test passes ``step_hooks=[die_at_step(...)]``
to ``run_stream``, the job carries the names to the workers, and the recipe calls each hook
after every training step. They live in the package (as ``torch.testing`` does) because Ray
workers must import them.
"""

from __future__ import annotations

import os
import time


def die_at_step(task: str, step: int, after_s: float = 0.0) -> tuple[str, dict]:
    """The last rank's process dies (``os._exit``) at ``step`` of ``task``, on the worker group's
    first attempt only: a restarted group then resumes from its checkpoint. ``after_s``: wait
    first, so Ray Train's controller has taken the checkpoint just reported (it polls the
    workers every 2 s; a fast worker can die before a poll, and the restart then resumes from
    the one before): a few polls' worth, e.g. 5 s."""
    return ("treelora.testing:DieAtStep", {"task": task, "step": step, "after_s": after_s})


class DieAtStep:
    def __init__(self, task: str, step: int, after_s: float = 0.0):
        self.task, self.step, self.after_s = task, step, after_s

    def __call__(self, recipe, phase, rec) -> None:
        comm = recipe.comm
        if phase.key == self.task and rec.step == self.step and not recipe.restarted and comm.rank == comm.world_size - 1:
            time.sleep(self.after_s)
            os._exit(1)
