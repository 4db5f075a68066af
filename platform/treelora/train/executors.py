"""The in-process executor: the recipe in this process, no Ray and no DeepSpeed.

It is the reference the distributed run is checked against, and what ``bench_quality`` and
``treelora run --local`` use; it takes the GPU when there is one (bf16 base weights, the LoRA
weights in fp32 as peft keeps them).
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from .job import SingleProcess, StreamJob
from .loop import torch_steppers
from .recipe import StreamRecipe
from .setup import open_tree, use_bf16


class InProcess:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self._trees: dict = {}

    def tree(self, uri: str):
        if uri not in self._trees:  # one registry per storage URI: the stream and the recipe read the same one
            self._trees[uri] = open_tree(self.cfg, uri, service=False)
        return self._trees[uri]

    def run(self, job: StreamJob, poll, log, emit=None) -> None:
        # the ledger takes each phase as soon as its folder is written (after_phase)
        recipe = StreamRecipe(job, comm=SingleProcess(), device=self.device, use_bf16=use_bf16(self.cfg, self.device),
                              make_stepper=torch_steppers(self.cfg.train),
                              tree=self.tree(job.run_layout.tree_uri), log=log, after_phase=poll, emit=emit)
        recipe.setup()
        recipe.run()
