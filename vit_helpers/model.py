"""The Vision Transformer of Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words".

Read this file top to bottom: it follows section 3.1 and Figure 1 of the paper.

    z_0     = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos       (Eq. 1)  PatchEmbedding, ViT
    z'_l    = MSA(LN(z_{l-1})) + z_{l-1}                                (Eq. 2)  MultiheadSelfAttention
    z_l     = MLP(LN(z'_l)) + z'_l                                      (Eq. 3)  MLPBlock
    y       = LN(z_L^0)                                                 (Eq. 4)  ViT

`ViT.forward` computes only what Eq. 4 reads: the last layer works out the class token's row alone (the same
logits and gradients up to rounding, 7% fewer FLOPs for ViT-B/16); `forward_features` computes every token.

Parameter names match timm's `VisionTransformer` one to one (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.attn.qkv`, ...), so timm checkpoints load without renaming and torchvision's by a rename
(`vit_helpers.weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.ops import StochasticDepth

# --------------------------------------------------------------------------------------------------------------
# Configuration: Table 1 of the paper, plus the smaller "Ti" and "S" sizes from DeiT (Touvron et al., 2021).
# --------------------------------------------------------------------------------------------------------------

#: size name -> (embed_dim D, num_layers L, num_heads, mlp_dim). Table 1: "Layers, Hidden size D, MLP size, Heads".
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

#: The patch size a name without one means ("ViT-H" is ViT-H/14 in the paper; the others are /16).
DEFAULT_PATCH_SIZE = {"Ti": 16, "S": 16, "B": 16, "L": 16, "H": 14}

#: The presets the paper and its follow-ups train; any "ViT-<size>/<patch>" with a known size is accepted.
NAMED_MODELS = ("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "ViT-H/14")

#: The ways `ViT.reset_parameters` can start the weights: "official", as the paper's JAX code; "timm", a normal
#: distribution of std 0.02 for every linear layer, as timm and DeiT (which trains ViTs without extra data).
INITS = ("official", "timm")

#: `ViTConfig.attention_kernel`'s choices: which of `F.scaled_dot_product_attention`'s kernels runs on a CUDA GPU.
#: None lets PyTorch choose: on the H200 under bf16, cuDNN's flash attention, which took 43% of the GPU's time in a
#: training step of the cifar10 recipe's model (heads of D_h = 16, 65 tokens; BENCHMARKS.md). Timed one by one on the
#: H200 (2026-11-28, that model compiled, batch 2048, ms a step): PyTorch's choice 26.8, cudnn 26.8, flash 32.3,
#: efficient 36.0, math 43.7, so None stays the default. `scripts/gpu_checks.py --checks attention` times them.
ATTENTION_KERNELS: dict[str, SDPBackend] = {
    "math": SDPBackend.MATH,  # plain matrix products and a softmax, which torch.compile fuses like any other ops
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # the memory-efficient kernel (any precision)
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 (16-bit inputs only)
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN's (16-bit inputs only)
}

_NAME_PATTERN = re.compile(r"^vit-(ti|s|b|l|h)(?:/(\d+))?$", re.IGNORECASE)


def _heads_message(embed_dim: int, num_heads: int) -> str:
    """The error for an embed_dim that the heads cannot share equally, with the head counts that would work."""
    divisors = [k for k in range(1, min(embed_dim, 32) + 1) if embed_dim % k == 0]
    return (f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: each head gets embed_dim / num_heads "
            f"features, so choose num_heads from {divisors} (or change embed_dim).")


@dataclass(frozen=True)
class ViTConfig:
    """Every hyper-parameter of a ViT. `ViTConfig.named("ViT-B/16")` gives the paper's ViT-Base with 16x16 patches."""

    image_size: int = 224  # images are image_size x image_size pixels
    patch_size: int = 16  # P: each patch is P x P pixels
    in_channels: int = 3  # C: RGB
    num_classes: int = 1000
    embed_dim: int = 768  # D: "constant latent vector size D through all of its layers"
    num_layers: int = 12  # L
    num_heads: int = 12  # k in Appendix A
    mlp_dim: int = 3072  # width of the MLP's hidden layer
    dropout: float = 0.0  # Appendix B.1, Table 3: 0.1 for ImageNet and ImageNet-21k, 0.0 for JFT-300M
    attention_dropout: float = 0.0
    # Stochastic depth (Huang et al. 2016; not in the paper, from DeiT, which trains ViTs on ImageNet alone): in
    # training, each layer's two residual branches are skipped for a whole image at a time, the last layer's with
    # probability drop_path, earlier layers' proportionally less (the first never). 0: off, the paper's model.
    drop_path: float = 0.0
    init: str = "official"  # how ViT.reset_parameters starts the weights: one of INITS
    # How the attention is computed, not what: one of ATTENTION_KERNELS, or None for PyTorch's choice. The same
    # function either way (to rounding). Every kernel is CUDA's; on the CPU, "math" is used and the others leave
    # the choice to PyTorch, so that a model trained with one runs anywhere.
    attention_kernel: str | None = None

    def __post_init__(self) -> None:
        # Positive sizes first: a zero patch_size or num_heads would otherwise fail below as a ZeroDivisionError.
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "embed_dim", "num_layers",
                     "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.image_size % self.patch_size != 0:
            below = self.patch_size * max(1, self.image_size // self.patch_size)
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                f"choose {below} or {below + self.patch_size}, or another patch size."
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(_heads_message(self.embed_dim, self.num_heads))
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} is a probability of dropping, from 0 (off) up to but not including 1; got "
                                 f"{getattr(self, name)}.")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {', '.join(map(repr, ATTENTION_KERNELS))} or None "
                             f"(PyTorch chooses), got {self.attention_kernel!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))} (see ViT.reset_parameters), got "
                             f"{self.init!r}.")

    @classmethod
    def named(cls, name: str, **overrides) -> "ViTConfig":
        """A preset by the paper's name, e.g. "ViT-B/16", "ViT-L/32", "ViT-Ti" (patch 16), "ViT-H" (patch 14).

        Any field can be overridden: `ViTConfig.named("ViT-Ti/4", image_size=32, num_classes=10)`.
        """
        match = _NAME_PATTERN.match(name.strip())
        if match is None:
            raise ValueError(f"unknown model {name!r}: use one of {', '.join(NAMED_MODELS)} "
                             f"(or a size alone: ViT-Ti, ViT-S, ViT-B, ViT-L, ViT-H).")
        size = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}[match.group(1).lower()]
        patch_size = int(match.group(2)) if match.group(2) else DEFAULT_PATCH_SIZE[size]
        embed_dim, num_layers, num_heads, mlp_dim = MODEL_SIZES[size]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"ViTConfig has no field(s) {unknown}; fields are {sorted(fields)}.")
        settings = dict(patch_size=patch_size, embed_dim=embed_dim, num_layers=num_layers,
                        num_heads=num_heads, mlp_dim=mlp_dim)
        settings.update(overrides)
        return cls(**settings)

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image: H / P."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N = HW / P^2, the length of the patch sequence."""
        return self.grid_size ** 2

    @property
    def num_tokens(self) -> int:
        """N + 1: the patches plus the class token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        """D_h = D / k, the width of each attention head (Appendix A)."""
        return self.embed_dim // self.num_heads

    def forward_macs(self) -> int:
        """Multiply-accumulates of one image's forward pass, counted analytically (17.56e9 for ViT-B/16 at 224).

        Counts every matrix product (patch embedding, qkv, QK^T, attention x V, output projection, both MLP
        layers, head); LayerNorm, GELU, softmax and additions are a fraction of a percent and left out, as is
        usual for MFU.
        """
        tokens, dim = self.num_tokens, self.embed_dim
        patch_embedding = self.num_patches * dim * (self.in_channels * self.patch_size ** 2)
        attention = (tokens * dim * 3 * dim  # qkv projection
                     + 2 * tokens * tokens * dim  # QK^T and weights x V, summed over heads
                     + tokens * dim * dim)  # output projection
        mlp = 2 * tokens * dim * self.mlp_dim
        head = dim * self.num_classes
        return patch_embedding + self.num_layers * (attention + mlp) + head

    def unread_macs(self) -> int:
        """Multiply-accumulates of the last layer whose results Eq. 4 never reads (every token's but the class
        token's query, attention row, output projection and MLP); `ViT.forward` skips them. 1.22e9 for B/16."""
        others, dim = self.num_tokens - 1, self.embed_dim
        return others * (dim * dim + 2 * self.num_tokens * dim + dim * dim + 2 * dim * self.mlp_dim)

    def forward_flops(self) -> int:
        """FLOPs of one image's forward pass: two per multiply-accumulate (35.1e9 for ViT-B/16 at 224)."""
        return 2 * self.forward_macs()

    def training_flops(self) -> int:
        """FLOPs of one image's training step: the backward pass costs about twice the forward (105.4e9 for B/16)."""
        return 3 * self.forward_flops()

    def executed_training_flops(self) -> int:
        """`training_flops` less the unread tokens `ViT.forward` skips (`unread_macs`, forward and backward): the
        arithmetic our training step performs (98.1e9 for B/16)."""
        return self.training_flops() - 3 * 2 * self.unread_macs()


# --------------------------------------------------------------------------------------------------------------
# Initialisation as in the official JAX implementation (google-research/vision_transformer, models_vit.py).
# --------------------------------------------------------------------------------------------------------------

def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init: truncated normal (at 2 std) with variance 1 / fan_in."""
    fan_in = tensor[0].numel()  # in_features, or in_channels * kH * kW for a convolution
    # 0.8796 is the standard deviation of a unit normal truncated at +-2; dividing by it restores variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


# --------------------------------------------------------------------------------------------------------------
# Eq. 1: patches x_p E
# --------------------------------------------------------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Eq. 1, the patch part: x_p^i E for every patch i.

    "We reshape the image x in R^{H x W x C} into a sequence of flattened 2D patches x_p in R^{N x (P^2 C)} ...
    and map to D dimensions with a trainable linear projection."  A Conv2d whose kernel and stride both equal P
    computes exactly that: each output position sees one patch, and its kernel is the matrix E.
    """

    def __init__(self, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (batch, channels, height, width), got shape "
                             f"{tuple(images.shape)}; add a batch dimension with images.unsqueeze(0).")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images, got {images.dtype}; convert them, e.g. uint8 pixels "
                             f"with images.float() / 255 (then normalise as in training).")
        _, channels, height, width = images.shape
        if channels != self.in_channels:
            raise ValueError(f"expected images with {self.in_channels} channels, got {channels} "
                             f"(shape {tuple(images.shape)}); convert them, e.g. with .convert('RGB'), or build the "
                             f"model with in_channels={channels}.")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image height and width must be multiples of the patch size {self.patch_size}, "
                             f"got {height}x{width}; resize or crop the images first.")
        patches = self.proj(images)  # (batch, embed_dim, height / P, width / P)
        return patches.flatten(2).transpose(1, 2)  # (batch, num_patches, embed_dim)


# --------------------------------------------------------------------------------------------------------------
# Eq. 2: multi-head self-attention
# --------------------------------------------------------------------------------------------------------------

class MultiheadSelfAttention(nn.Module):
    """Eq. 2's MSA (Appendix A, Eqs. 5-8): k heads of softmax(q k^T / sqrt(D_h)) v, concatenated and projected.

    [q, k, v] = z U_qkv comes from one fused Linear `qkv` (one matrix product instead of three), and the heads'
    outputs are mixed by `proj` (U_msa). Two paths compute the same function:
    - the explicit one writes softmax(QK^T / sqrt(D_h)) V out, and can return the attention weights;
    - `F.scaled_dot_product_attention` fuses it into one kernel that never stores the (tokens x tokens) weight
      matrix: on CUDA, flash attention under bf16 autocast, a memory-efficient fused kernel in float32 (flash
      attention takes only 16-bit inputs), or the kernel `ViTConfig.attention_kernel` names. It is used whenever
      the weights are not asked for.
    """

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, attention_dropout: float = 0.0,
                 dropout: float = 0.0, fused: bool = True, kernel: str | None = None):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(_heads_message(embed_dim, num_heads))
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attention_dropout = attention_dropout
        self.fused = fused  # set False to run the explicit path everywhere, e.g. to compare the two
        self.kernel = ATTENTION_KERNELS[kernel] if kernel else None  # the fused path's kernel on CUDA (ViTConfig)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False, first_query_only: bool = False):
        """x (batch, tokens, embed_dim) -> (batch, tokens, embed_dim), and the weights if `return_attention`.

        `first_query_only=True` computes token 0's output alone, (batch, 1, embed_dim): its query against every
        token's key and value. `ViT.forward` uses it in the last layer, where nothing else is read.
        """
        batch, tokens, embed_dim = x.shape
        if first_query_only:
            # The same fused weights, split: W_q for token 0 only, W_k and W_v for every token.
            w_q, w_kv = self.qkv.weight.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = self.qkv.bias.split([embed_dim, 2 * embed_dim])
            # x[:, 0] is a plain (batch, D) matrix: F.linear runs it as one addmm, bias included.
            q = F.linear(x[:, 0], w_q, b_q).view(batch, self.num_heads, 1, self.head_dim)
            kv = F.linear(x, w_kv, b_kv).reshape(batch, tokens, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        else:
            qkv = self.qkv(x)  # (batch, tokens, 3 * embed_dim)
            qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)

        if return_attention or not self.fused:
            weights = self.attention_weights(q, k)  # (batch, heads, tokens, tokens)
            out = self.attn_drop(weights) @ v  # (batch, heads, tokens, head_dim)
        else:
            weights = None
            dropout_p = self.attention_dropout if self.training else 0.0
            # The named kernel where this device has it (CUDA has every kernel; the CPU has "math"), else PyTorch's
            # choice. torch.compile traces both contexts: no graph break.
            named = self.kernel is not None and (q.is_cuda or self.kernel == SDPBackend.MATH)
            with sdpa_kernel(self.kernel) if named else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

        out = out.transpose(1, 2).reshape(batch, q.shape[2], embed_dim)  # concatenate the heads
        out = self.proj_drop(self.proj(out))
        return (out, weights) if return_attention else out

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A = softmax(q k^T / sqrt(D_h)) (Appendix A, Eq. 6): row i says how much token i attends to each token."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (batch, heads, tokens, tokens)
        # softmax in float32 even under bf16 autocast: exponentials of large scores lose precision otherwise.
        return scores.float().softmax(dim=-1).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Eq. 3: the MLP
# --------------------------------------------------------------------------------------------------------------

class MLPBlock(nn.Module):
    """Eq. 3's MLP: "two layers with a GELU non-linearity" (section 3.1), with dropout after each Dense
    (Appendix B.1: "Dropout ... is applied after every dense layer except for the qkv-projections")."""

    def __init__(self, embed_dim: int = 768, mlp_dim: int = 3072, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        # Exact (erf) GELU, as timm and torchvision use; the official Flax code uses its tanh approximation
        # (flax.linen.gelu's default), which differs by under 1e-3 (notebook 04 measures it).
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, embed_dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, embed_dim) -> (batch, tokens, mlp_dim) -> (batch, tokens, embed_dim)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# --------------------------------------------------------------------------------------------------------------
# Eqs. 2 and 3 together: one encoder layer
# --------------------------------------------------------------------------------------------------------------

class TransformerEncoderBlock(nn.Module):
    """One layer of the encoder, Eqs. 2 and 3 (pre-norm):

        z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        z_l  = MLP(LN(z'_l)) + z'_l

    "Layernorm (LN) is applied before every block, and residual connections after every block."

    With `drop_path` p > 0 (stochastic depth, not the paper's), training drops each branch, MSA(...) and MLP(...),
    for a whole image with probability p and scales it by 1 / (1 - p) where it is kept, so that its expected
    value is unchanged: each image trains a random shallower network. In eval mode both branches always run.
    """

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0, attention_kernel: str | None = None):
        super().__init__()
        # eps 1e-6 as in the official code (Flax's default); PyTorch's default 1e-5 would change the outputs.
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn = MultiheadSelfAttention(embed_dim, num_heads, attention_dropout, dropout, kernel=attention_kernel)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = MLPBlock(embed_dim, mlp_dim, dropout)
        self.drop_path = StochasticDepth(drop_path, mode="row")  # "row": per image; the identity when p is 0

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """`class_token_only=True` returns z_l^0 alone, (batch, 1, embed_dim): what the last layer must compute."""
        attended = self.attn(self.norm1(x), return_attention=return_attention, first_query_only=class_token_only)
        attended, weights = attended if return_attention else (attended, None)
        if class_token_only:
            x = x[:, :1]  # the other tokens' rows are never read again
        x = x + self.drop_path(attended)  # Eq. 2
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # Eq. 3
        return (x, weights) if return_attention else x


# --------------------------------------------------------------------------------------------------------------
# Eqs. 1-4: the whole model
# --------------------------------------------------------------------------------------------------------------

def drop_path_rates(drop_path: float, num_layers: int) -> list[float]:
    """Each layer's stochastic-depth probability: rising linearly from 0 at the first layer to `drop_path` at the
    last, as DeiT and timm set them (the deeper the layer, the more often it is skipped)."""
    return [drop_path * layer / max(1, num_layers - 1) for layer in range(num_layers)]


class ViT(nn.Module):
    """The Vision Transformer, Eqs. 1-4.

        z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos     (Eq. 1)
        z_l = TransformerEncoderBlock(z_{l-1}), l = 1..L    (Eqs. 2, 3)
        y   = LN(z_L^0)                                     (Eq. 4)
        logits = head(y)

    "Similar to BERT's [class] token, we prepend a learnable embedding to the sequence of embedded patches
    (z_0^0 = x_class), whose state at the output of the Transformer encoder (z_L^0) serves as the image
    representation y." Position embeddings are learnable and 1-D ("we have not observed significant performance
    gains from using more advanced 2D-aware position embeddings").
    """

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = config = config or ViTConfig()
        self.patch_embed = PatchEmbedding(config.patch_size, config.in_channels, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))  # x_class
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.embed_dim))  # E_pos
        self.pos_drop = nn.Dropout(config.dropout)  # Appendix B.1: dropout "directly after adding positional-"
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(config.embed_dim, config.num_heads, config.mlp_dim, config.dropout,
                                    config.attention_dropout, drop_path, config.attention_kernel)
            for drop_path in drop_path_rates(config.drop_path, config.num_layers)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)  # the LN of Eq. 4
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as `config.init` says.

        "official" (the default), as the official JAX code does (google-research/vision_transformer):

        - patch embedding: LeCun normal (Flax's default for Conv), bias zero;
        - position embeddings: normal with std 0.02; class token: zeros;
        - q, k, v and the attention output: Xavier uniform, bias zero. In the official code q, k and v are three
          separate D x D layers, so each third of our fused `qkv` weight gets its own Xavier bound, not one bound
          computed over the fused 3D x D matrix;
        - MLP: Xavier uniform, bias normal with std 1e-6;
        - head: zeros, as the official code (and section 3.2's "zero-initialized D x K feedforward layer" when
          fine-tuning), so the first logits are all equal and the loss starts exactly at log(num_classes);
        - LayerNorm: weight one, bias zero (PyTorch's default).

        "timm", as timm's VisionTransformer (and DeiT): every linear layer, the head included, normal with std 0.02
        (truncated at +-2, which never bites) and bias zero; position embeddings the same; class token normal with
        std 1e-6; patch embedding and LayerNorm PyTorch's defaults. At ViT-Ti and ViT-S widths these weights are
        2-4 times smaller than Xavier's, so each block starts closer to passing its input through; trained from
        scratch on a small data set the model learns faster from them (BENCHMARKS.md, "Which initialisation").
        """
        if self.config.init == "timm":
            self._reset_parameters_as_timm()
            return
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.cls_token)
        for block in self.blocks:
            for third in block.attn.qkv.weight.chunk(3, dim=0):  # W_q, W_k, W_v, each (D, D)
                nn.init.xavier_uniform_(third)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for layer in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.norm.reset_parameters()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _reset_parameters_as_timm(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.LayerNorm)):
                module.reset_parameters()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos, shape (batch, num_patches + 1, embed_dim)."""
        patches = self.patch_embed(images)  # (batch, num_patches, embed_dim)
        # Compare height and width, not the number of patches: a 16x64 image has as many 8x8 patches as a 32x32
        # one, but its grid is 2 x 8, and the position embeddings of a 4 x 4 grid would label them wrongly.
        if tuple(images.shape[-2:]) != (self.config.image_size, self.config.image_size):
            raise ValueError(
                f"this model was built for {self.config.image_size}x{self.config.image_size} images "
                f"({self.config.num_patches} patches), got {tuple(images.shape[-2:])} ({patches.shape[1]} patches); "
                f"resize the images, or build the model with image_size set and resample the position "
                f"embeddings with vit_helpers.weights.resample_position_embeddings."
            )
        cls_token = self.cls_token.expand(patches.shape[0], -1, -1)  # (batch, 1, embed_dim)
        tokens = torch.cat([cls_token, patches], dim=1)  # (batch, num_patches + 1, embed_dim)
        return self.pos_drop(tokens + self.pos_embed)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Every token after the encoder and the final LayerNorm: (batch, num_patches + 1, embed_dim)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)  # Eqs. 2 and 3
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, num_classes), read from the class token's final state y = LN(z_L^0) (Eq. 4).

        Equal to `self.head(self.forward_features(images)[:, 0])`, but Eq. 4 reads only the class token of the
        last layer, so that layer computes that one token's output (every token still supplies keys and values).
        The other tokens' queries, attention rows, output projections and MLPs there would be thrown away: for
        ViT-B/16 that is 7% of the model's FLOPs (`ViTConfig.unread_macs`), saved in training and inference alike.
        """
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)  # Eqs. 2 and 3
        class_token = self.blocks[-1](x, class_token_only=True)  # z_L^0, (batch, 1, embed_dim)
        return self.head(self.norm(class_token[:, 0]))  # Eq. 4, then the classifier

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's attention weights for `images`: a list of L tensors (batch, heads, tokens, tokens).

        Token 0 is the class token; tokens 1..N are the patches in row-major order over the grid. Every layer
        computes every token (no class-token shortcut), and the model runs in eval mode, so dropout cannot change
        the maps; every module's mode is restored afterwards.
        """
        modes = [(module, module.training) for module in self.modules()]  # each one's, in case some are frozen
        self.eval()
        try:
            x = self.embed(images)
            maps = []
            for block in self.blocks:
                x, weights = block(x, return_attention=True)
                maps.append(weights)
        finally:
            for module, training in modes:
                module.training = training
        return maps

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
