"""The in-process executor: the recipe in this process, no Ray and no DeepSpeed.

It is the reference the distributed run is checked against, and what ``bench_quality`` and
``treelora run --local`` use; it takes the GPU when there is one (bf16 base weights, the LoRA
weights in fp32 as peft keeps them).
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from .loop import TorchStepper, lr_scheduler
from .recipe import SingleProcess, StreamJob, StreamRecipe


class InProcess:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.use_bf16 = self.device.type == "cuda" and cfg.scaling.precision != "fp32"
        self._trees: dict = {}

    def tree(self, uri: str):
        """One registry per storage URI in this process: the stream and the recipe must read
        the same one (a registry caches what it has read)."""
        from tree_service import TreeRegistry

        if uri not in self._trees:
            self._trees[uri] = TreeRegistry(uri)
        return self._trees[uri]

    def run(self, job: StreamJob, poll, log, emit=None) -> None:
        cfg = self.cfg

        def make_stepper(model, params, lr, total_steps):
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
            return TorchStepper(optimizer, lr_scheduler(optimizer, total_steps, cfg.train.schedule, cfg.train.warmup_ratio),
                                cfg.train.grad_clip, cfg.train.grad_accum)

        # the ledger takes each phase as soon as its folder is written
        recipe = StreamRecipe(job, comm=SingleProcess(), device=self.device, use_bf16=self.use_bf16, make_stepper=make_stepper,
                              tree=self.tree(job.tree_uri), log=log, after_phase=poll, emit=emit)
        recipe.setup()
        recipe.run()
