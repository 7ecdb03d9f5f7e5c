"""A tiny pre-norm transformer encoder classifier over a sequence of feature vectors.

``embed`` Linear(F, d) + learned ``pos_embed`` -> ``blocks`` of [LN - MultiHeadSelfAttention - LN - MLP(GELU)]
(both residual) -> final LN -> mean over time -> ``head``. Attention is written out (no
``nn.MultiheadAttention``) so that pruning can narrow ``qkv``/``proj`` and MAC counters can hook the
parameter-free :class:`AttentionMatmul` (2 * B * H * T * T * head_dim MACs).
"""

from __future__ import annotations

import torch
from torch import nn

from .._layer_specs import register_layer_spec
from ..errors import ConfigError
from ._presets import CIFAR_PREPROCESS
from ._registry import register_model


class AttentionMatmul(nn.Module):
    """softmax(Q K^T / sqrt(head_dim)) V for q, k, v of shape (B, H, T, head_dim)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        attn = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
        return torch.matmul(attn.softmax(dim=-1), v)  # (B, H, T, head_dim)


class MultiHeadSelfAttention(nn.Module):
    """``qkv`` Linear(d, 3*H*hd) -> ``matmul`` per head -> ``proj`` Linear(H*hd, d).

    ``head_dim`` is derived at run time from ``qkv``'s output width and ``num_heads``, so removing whole
    heads (narrow qkv/proj and lower ``num_heads``) or narrowing every head keeps the module runnable.
    """

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.matmul = AttentionMatmul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        qkv = self.qkv(x)  # (B, T, 3*H*hd)
        head_dim = qkv.shape[-1] // 3 // self.num_heads
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        out = self.matmul(qkv[0], qkv[1], qkv[2])  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * head_dim)
        return self.proj(out)


def _attention_from_spec(args: dict) -> MultiHeadSelfAttention:
    """Rebuild a (possibly head-pruned) attention block: its qkv / proj Linears are rebuilt from their own
    layer specs, ``num_heads`` from the manifest (it need not divide ``dim`` once heads were removed)."""
    m = MultiHeadSelfAttention(int(args["dim"]), 1)
    m.num_heads = int(args["num_heads"])
    return m


register_layer_spec(
    MultiHeadSelfAttention,
    lambda m: dict(dim=m.proj.out_features, num_heads=m.num_heads),
    _attention_from_spec,
)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(model: nn.Module, *params: nn.Parameter) -> None:
    """Truncated-normal (std 0.02) ``params`` (embeddings, tokens), then every Linear's weight; zero biases."""
    for p in params:
        nn.init.trunc_normal_(p, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class TransformerClassifier(nn.Module):
    """(B, T, F) -> ``embed`` + ``pos_embed`` -> ``blocks`` -> ``norm`` -> mean over T -> ``head``."""

    def __init__(
        self,
        input_size: int = 96,
        seq_len: int = 32,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
    ):
        super().__init__()
        self.input_shape = (seq_len, input_size)
        self.embed = nn.Linear(input_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_weights(self, self.pos_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, F) -> (B, T, d) -> (B, d) -> (B, num_classes)
        x = self.embed(x) + self.pos_embed[:, : x.shape[1]]
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@register_model(
    "transformer_tiny",
    family="transformer",
    input_shape=(32, 96),
    input_kind="sequence",
    dataset="cifar10-rows",
    preprocess=CIFAR_PREPROCESS,
)
def transformer_tiny(
    input_size: int = 96,
    seq_len: int = 32,
    dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    num_classes: int = 10,
) -> TransformerClassifier:
    """Tiny pre-norm transformer encoder (d=64, 4 blocks, 4 heads) over CIFAR-10 rows (32 x 96)."""
    return TransformerClassifier(input_size, seq_len, dim, depth, num_heads, mlp_ratio, num_classes)


class VisionTransformer(nn.Module):
    """ViT for small images: ``patch_embed`` Conv2d(3, d, p, stride p) -> tokens + a class token + learned
    ``pos_embed`` -> ``blocks`` (pre-norm, as :class:`TransformerClassifier`) -> ``norm`` -> the class token ->
    ``head``."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 10):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.input_shape = (in_chans, image_size, image_size)
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_weights(self, self.pos_embed, self.cls_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model(
    "vit_tiny_cifar",
    family="transformer",
    input_shape=(3, 32, 32),
    preprocess=CIFAR_PREPROCESS,
    description="ViT-Tiny widths (d=192, 12 blocks, 3 heads, MLP 768) on 4x4 patches of 32x32 images: 65 tokens",
)
def vit_tiny_cifar(image_size: int = 32, patch_size: int = 4, dim: int = 192, depth: int = 12, num_heads: int = 3,
                   mlp_ratio: float = 4.0, num_classes: int = 10) -> VisionTransformer:
    """ViT-Tiny (d=192, 12 blocks, 3 heads) on 4x4 patches of CIFAR-10 images (64 patches + a class token)."""
    return VisionTransformer(image_size, patch_size, 3, dim, depth, num_heads, mlp_ratio, num_classes)
