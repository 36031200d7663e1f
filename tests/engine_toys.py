"""Tiny stand-ins for a model and a dataset, to test the training engine on its own.

Not a test module (no ``test_`` prefix); also run as a script under ``torchrun`` by the DDP
test: ``python tests/engine_toys.py OUT BATCH STEPS``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class ToyTemporalNet(torch.nn.Module):
    """Per-frame conv, a causal running mean over time, a 1x1 head: (n, t, c, h, w) -> logits."""

    streamable, frames = True, None

    def __init__(self, in_channels: int = 1, classes: int = 2, hidden: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.enc = torch.nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)  # norm follows
        self.norm = torch.nn.InstanceNorm2d(hidden, affine=True)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Conv2d(2 * hidden, classes, 1)
        self.config = {"name": "toy"}

    def forward(self, x, state=None, return_state=False):
        n, t = x.shape[:2]
        f = torch.relu(self.norm(self.enc(x.flatten(0, 1)))).unflatten(0, (n, t))
        f = self.drop(f)
        s0 = torch.zeros_like(f[:, 0]) if state is None else state[0]
        k0 = 0 if state is None else state[1]
        csum = s0.unsqueeze(1) + f.cumsum(1)
        count = torch.arange(k0 + 1, k0 + t + 1, dtype=f.dtype).reshape(1, t, 1, 1, 1)
        mem = csum / count
        y = self.head(torch.cat([f, mem], 2).flatten(0, 1)).unflatten(0, (n, t))
        return (y, (csum[:, -1], k0 + t)) if return_state else y


class ToySequences(torch.utils.data.Dataset):
    """Deterministic random sequences with a thresholded-blur label."""

    def __init__(self, length: int = 8, frames: int = 4, size: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(length, frames, 1, size, size, generator=g)
        blur = torch.nn.functional.avg_pool2d(self.images.flatten(0, 1), 3, 1, 1)
        self.labels = (blur > 0.1).long().unflatten(0, (length, frames))[:, :, 0]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "length": self.images.shape[1]}


def run(out: str, batch: int, steps: int) -> None:
    """Train the toy for ``steps`` and save every rank's parameters as ``rank{r}.safetensors``."""
    from safetensors.torch import save_file

    from clstm4d.engine.run.config import TrainConfig
    from clstm4d.engine.training.loop import fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ToyTemporalNet()
    cfg = TrainConfig(out=out, steps=steps, lr=1e-2, warmup_steps=2, log_every=1,
                      progress=False, device="cpu", seed=3)
    fit(model, ToySequences(), cfg, batch_size=batch, saved_config={"model": {"name": "toy"}})
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(Path(out) / f"rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
