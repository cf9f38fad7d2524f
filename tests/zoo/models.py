"""The architectures people train, small configurations: the model zoo of the init/param_groups tests."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _torchvision import models


class GPTBlock(nn.Module):
    """Pre-LN GPT-2 block: causal self-attention and an MLP with ``F.gelu`` inside ``forward``."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, GPT blocks, final LayerNorm and an ``lm_head`` tied to ``wte``."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, ctx: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GPTBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


class RNNClassifier(nn.Module):
    def __init__(self, cell: type, d_in: int = 8, hidden: int = 32, k: int = 4) -> None:
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Seq2Seq(nn.Module):
    """``nn.Transformer`` encoder and decoder with a linear readout."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.t = nn.Transformer(d, 4, 2, 2, 64, batch_first=True)
        self.out = nn.Linear(d, 10)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.out(self.t(src, tgt))


def bn_dropout_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def depthwise_relu6_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(inplace=True),
        nn.Conv2d(16, 32, 1), nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def zoo() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]]:
    """name -> (model builder, example-input builder)."""
    tvm = models()
    img = lambda: (torch.randn(2, 3, 96, 96),)  # noqa: E731 - large enough that padding does not dominate
    return {
        "resnet18": (lambda: tvm.resnet18(num_classes=10), img),
        "resnet50": (lambda: tvm.resnet50(num_classes=10), img),
        "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), img),
        "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), img),
        "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), img),
        "vit": (lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                              hidden_dim=64, mlp_dim=128, num_classes=10),
                lambda: (torch.randn(4, 3, 32, 32),)),
        "swin": (lambda: tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                             window_size=[4, 4], num_classes=10), img),
        "transformer_encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2),
                                lambda: (torch.randn(4, 6, 32),)),
        "transformer": (Seq2Seq, lambda: (torch.randn(4, 6, 32), torch.randn(4, 5, 32))),
        "gpt": (GPT, lambda: (torch.randint(0, 64, (4, 12)),)),
        "lstm": (lambda: RNNClassifier(nn.LSTM), lambda: (torch.randn(4, 7, 8),)),
        "gru": (lambda: RNNClassifier(nn.GRU), lambda: (torch.randn(4, 7, 8),)),
        "bn_dropout_cnn": (bn_dropout_cnn, img),
        "depthwise_relu6": (depthwise_relu6_cnn, img),
    }
