"""The Lightning adapter (runs only where Lightning is installed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from _monitor_refs import reference_ntk  # noqa: E402
from torch_crit.monitor import JSONLWriter, KernelFlowCallback, read_jsonl  # noqa: E402


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_callback_logs_and_detaches(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = _Module()
    cb = KernelFlowCallback(x[:4], y[:4], every=2, metrics=("preact_kernel", "ntk"), ntk_fn=reference_ntk,
                            writers=[JSONLWriter(tmp_path / "l.jsonl")], log_to_trainer=False)
    trainer = L.Trainer(max_steps=6, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)
    assert [r["step"] for r in read_jsonl(tmp_path / "l.jsonl")] == [0, 2, 4, 6]
    assert not cb.monitor.attached
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0
