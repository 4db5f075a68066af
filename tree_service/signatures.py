"""Task signatures: a float32 tensor [L, D] per task, one row per adapted module in model order.

A module's raw signature (e.g. the flattened mean gradient of its LoRA weights) has a size that
depends on the model. Two ways to fit it into the fixed width D of a stream:

* ``exact``: zero-pad to D (needs size <= D). Zero padding leaves L1 distances and dot products
  unchanged, so selection is exactly the paper's.
* ``cauchy``: a seeded random projection with i.i.d. standard Cauchy entries. Cauchy is 1-stable:
  each coordinate of ``C @ (x - y)`` is Cauchy with scale ``||x - y||_1``, so the *median* of the
  absolute coordinates estimates the L1 distance (Indyk, 2006) with relative error about
  ``1.57 / sqrt(D)``. This preserves the L1 geometry the paper's split and gaps use; a Gaussian or
  sign sketch would preserve L2 instead. Because the sketch is linear, the mean of sketches is the
  sketch of the mean, so the tree's node means stay consistent.
* ``sign``: a seeded Rademacher projection scaled by 1/sqrt(D); it preserves dot products in
  expectation (Johnson-Lindenstrauss), for the authors' ``dot`` similarity.

The distance used everywhere (tree split, bandit gaps) is ``SignatureSpace.distance``: plain L1
for exact signatures, the median estimator for Cauchy ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidSignature

PROJECTIONS = ("exact", "cauchy", "sign")
METRICS = ("l1", "dot")


@dataclasses.dataclass(frozen=True)
class SignatureSpace:
    """What every signature of a stream looks like, and how two of them are compared."""

    num_modules: int  # L
    width: int  # D
    projection: str = "exact"
    metric: str = "l1"
    seed: int = 0

    def __post_init__(self):
        if self.num_modules < 1 or self.width < 1:
            raise InvalidSignature(f"num_modules and width must be >= 1, got {self.num_modules}, {self.width}")
        if self.projection not in PROJECTIONS:
            raise InvalidSignature(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.metric not in METRICS:
            raise InvalidSignature(f"metric must be one of {METRICS}, got {self.metric!r}")
        # A sketch only preserves the geometry it was built for.
        if (self.metric, self.projection) in {("l1", "sign"), ("dot", "cauchy")}:
            raise InvalidSignature(
                f"projection {self.projection!r} does not preserve the {self.metric!r} metric: "
                "use 'cauchy' (or 'exact') with l1 and 'sign' (or 'exact') with dot"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_modules, self.width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- distances ------------------------------------------------------------------------
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Gap between signature rows, over the last axis (broadcasting). Smaller = more similar.

        For ``dot`` the gap is the negative dot product, so 'smaller is closer' holds for every
        metric and the tree and bandit need no special case.
        """
        if self.metric == "dot":
            return -(a * b).sum(-1)
        diff = (a - b).abs()
        if self.projection == "cauchy":
            return diff.median(dim=-1).values
        return diff.sum(-1)

    # -- building signatures --------------------------------------------------------------
    def check(self, signature, where: str = "signature") -> torch.Tensor:
        """Return the signature as a float32 CPU tensor [L, D] or raise naming what is wrong."""
        if isinstance(signature, np.ndarray):
            if signature.dtype != np.float32:
                raise InvalidSignature(f"{where}: dtype must be float32, got {signature.dtype}")
            # arrays from Ray's object store are read-only views; the tree keeps its own copy anyway
            signature = torch.from_numpy(signature if signature.flags.writeable else signature.copy())
        if not isinstance(signature, torch.Tensor):
            raise InvalidSignature(f"{where}: expected a tensor or numpy array, got {type(signature).__name__}")
        if signature.dtype != torch.float32:
            raise InvalidSignature(f"{where}: dtype must be float32, got {signature.dtype}")
        if tuple(signature.shape) != self.shape:
            raise InvalidSignature(
                f"{where}: shape must be [L={self.num_modules}, D={self.width}], got {list(signature.shape)}"
            )
        if not torch.isfinite(signature).all():
            raise InvalidSignature(f"{where}: contains NaN or infinite values")
        return signature.detach().cpu().contiguous()


@functools.lru_cache(maxsize=8)
def _matrix(projection: str, seed: int, size: int, width: int, device: str) -> torch.Tensor:
    """A projection matrix [size, width], built once per process: drawing one (float64, on the CPU,
    so every machine draws the same) takes about a second at a 7B model's module sizes, which a
    per-task rebuild would add to every task's first step."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + size)
    if projection == "cauchy":
        u = torch.rand(size, width, generator=gen, dtype=torch.float64)
        m = torch.tan(torch.pi * (u - 0.5))  # inverse CDF of the standard Cauchy
    else:
        m = torch.randint(0, 2, (size, width), generator=gen).double() * 2 - 1
        m /= width**0.5
    return m.float().to(device)


class Projector:
    """Maps raw per-module vectors of any size to a stream's signature width.

    Projection matrices are generated from (seed, module size) alone, so every worker of every
    job builds the same matrices without exchanging them. They are cached per module size and
    device.
    """

    def __init__(self, space: SignatureSpace):
        self.space = space

    def matrix(self, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return _matrix(self.space.projection, self.space.seed, size, self.space.width, str(torch.device(device)))

    def project_module(self, vector: torch.Tensor) -> torch.Tensor:
        """One module's raw vector (any shape) -> [D]."""
        flat = vector.reshape(-1).float()
        if self.space.projection == "exact":
            if flat.numel() > self.space.width:
                raise InvalidSignature(
                    f"a module's raw signature has {flat.numel()} values but the stream width is "
                    f"{self.space.width}: raise the width or use projection='cauchy'"
                )
            return torch.nn.functional.pad(flat, (0, self.space.width - flat.numel()))
        return flat @ self.matrix(flat.numel(), flat.device)

    def project(self, module_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw vectors of all L modules, in model order -> float32 [L, D] on their device."""
        if len(module_vectors) != self.space.num_modules:
            raise InvalidSignature(
                f"expected raw vectors for {self.space.num_modules} modules, got {len(module_vectors)}"
            )
        return torch.stack([self.project_module(v) for v in module_vectors])
