"""DualOpt in PyTorch Lightning: ``configure_optimizers`` returns DualOpt plus a per-step scheduler, and a
resume through Lightning's own checkpoint continues bit for bit with the pretrained anchors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from dualopt.torch import DualOpt  # noqa: E402

EPOCHS, BATCHES = 4, 4


class Classifier(L.LightningModule):
    """A pretrained backbone and a new head; the optimizer is DualOpt.for_finetuning with a warmup from 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12),
                                            torch.nn.Tanh()).double()
        self.head = torch.nn.Linear(12, 3).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = DualOpt.for_finetuning(self, head="head", lr=1e-2, head_lr=3e-2, layer_index="module")
        total = EPOCHS * BATCHES
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / 3, (total - s) / (total - 3)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader() -> Any:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 6, generator=g, dtype=torch.float64)
    y = torch.arange(BATCHES * 8) % 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def _trainer(root: Path, **kwargs: Any) -> Any:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt], **kwargs)


def test_lightning_checkpoint_resume_is_bitwise(tmp_path, one_torch_thread):
    whole = Classifier()
    pretrained = {n: p.detach().clone() for n, p in whole.named_parameters()}
    _trainer(tmp_path / "whole").fit(whole, _loader())
    opt = whole.trainer.optimizers[0]
    assert isinstance(opt, DualOpt)
    first = whole.backbone[0].weight
    assert opt.state[first]["step"] == EPOCHS * BATCHES
    torch.testing.assert_close(opt.state[first]["anchor"], pretrained["backbone.0.weight"], rtol=0, atol=0)
    assert opt.layer_rates()["backbone.0.weight"] == pytest.approx(1.0)  # 0.01 / lr, though the schedule starts at 0
    assert not torch.equal(first, pretrained["backbone.0.weight"])

    checkpoint = tmp_path / "whole" / "epoch=1.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    assert saved["param_groups"][0]["dualopt"] and any("anchor" in s for s in saved["state"].values())

    resumed = Classifier()
    with torch.no_grad():  # a different start: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    _trainer(tmp_path / "resumed").fit(resumed, _loader(), ckpt_path=checkpoint)
    for (name, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    ropt = resumed.trainer.optimizers[0]
    torch.testing.assert_close(ropt.state[resumed.backbone[0].weight]["anchor"], pretrained["backbone.0.weight"],
                               rtol=0, atol=0)
    assert ropt.state[resumed.backbone[0].weight]["step"] == EPOCHS * BATCHES


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_lightning_ddp_two_processes_resume_is_bitwise(tmp_path):
    script = Path(__file__).with_name("_lightning_ddp.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for rank in (0, 1):  # 32 samples, 8 per batch, 2 ranks, 3 epochs
        assert f"rank {rank} bitwise after 6 steps" in out.stdout, out.stdout[-2000:]
