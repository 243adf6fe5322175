"""Run by test_lightning.py in a subprocess: two CPU processes under Lightning's DDP (gloo), a fit, then a fit
resumed from the first epoch's checkpoint; each rank checks the resume is bitwise and the anchors pretrained.

Lightning's DDP launcher starts the second rank by running this file again, so it must be a file, not ``-c``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from dualopt.torch import DualOpt

EPOCHS = 3


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh()).double()
        self.head = torch.nn.Linear(12, 3).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> DualOpt:
        return DualOpt.for_finetuning(self, head="head", lr=1e-2, layer_index="module")


def loader() -> Any:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g, dtype=torch.float64), torch.arange(32) % 3)
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def trainer(root: Path) -> Any:
    ck = L.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ck])


def main(root: Path) -> None:
    whole = Net()
    pretrained = whole.backbone[0].weight.detach().clone()
    trainer(root / "whole").fit(whole, loader())
    resumed = Net()
    with torch.no_grad():  # a different start: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    trainer(root / "resumed").fit(resumed, loader(), ckpt_path=root / "whole" / "epoch=0.ckpt")
    opt = resumed.trainer.optimizers[0]
    first = resumed.backbone[0].weight
    assert torch.equal(opt.state[first]["anchor"], pretrained)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    print(f"rank {resumed.trainer.global_rank} bitwise after {int(opt.state[first]['step'])} steps")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
