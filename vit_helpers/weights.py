"""Weights: move checkpoints between our ViT and the formats pretrained ViTs are published in.

Formats (all hold the same tensors; only the names, and for the official one the layouts, differ):

- **ours = timm** (`timm.models.vision_transformer.VisionTransformer`): `cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2.*`, `norm.*`, `head.*`.
  `from_timm` / `to_timm` rename nothing; they check that no key is missing or unknown (timm variants such as
  `fc_norm` for average pooling, register tokens or LayerScale have no counterpart here).
- **torchvision** (`torchvision.models.vit_b_16` ...): `class_token`, `conv_proj.*`, `encoder.pos_embedding`,
  `encoder.layers.encoder_layer_{i}.ln_1|self_attention.in_proj_*|self_attention.out_proj|ln_2|mlp.0|mlp.3.*`,
  `encoder.ln.*`, `heads.head.*`. Files saved before torchvision 0.13 name the MLP `mlp.linear_1|linear_2`.
  `in_proj_weight` stacks W_q, W_k, W_v exactly as our fused `qkv` does, so `from_torchvision` /
  `to_torchvision` are pure renames.
- **official** Google JAX `.npz` (google-research/vision_transformer, `models_vit.py`): flattened Flax
  parameters `embedding/kernel` (HWIO), `cls` (1, 1, D), `Transformer/posembed_input/pos_embedding`,
  `Transformer/encoderblock_{i}/LayerNorm_0|LayerNorm_2/scale|bias`,
  `.../MultiHeadDotProductAttention_1/query|key|value/kernel` (D, heads, head_dim) and `bias` (heads, head_dim),
  `.../MultiHeadDotProductAttention_1/out/kernel` (heads, head_dim, D), `.../MlpBlock_3/Dense_0|Dense_1/kernel`
  (in, out), `Transformer/encoder_norm/scale|bias`, `head/kernel|bias`, and in the original ImageNet-21k
  checkpoints a `pre_logits` layer. `from_official_npz` / `to_official_npz` transpose and reshape.

Beyond renaming: `resample_position_embeddings` and `adapt_state_dict` / `load_into` / `vit_from_state_dict`
move a checkpoint to another image size or number of classes (section 3.2 of the paper: fine-tuning at higher
resolution "2D interpolation of the pre-trained position embeddings"), `replace_head` attaches the paper's
zero-initialised head, and `load_torchvision_pretrained` fetches torchvision's ImageNet weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit_helpers.files import atomic_write
from vit_helpers.model import MODEL_SIZES, ViT, ViTConfig

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------------------
# Our (= timm's) names, and a check that a state dict has exactly them
# --------------------------------------------------------------------------------------------------------------

_TOP_LEVEL_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                   "norm.weight", "norm.bias", "head.weight", "head.bias")
_BLOCK_KEYS = tuple(f"{module}.{kind}" for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                       "mlp.fc2") for kind in ("weight", "bias"))
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _some(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _unwrap(state_dict: Mapping) -> StateDict:
    """A plain dict of the same tensors, without the `module.` / `_orig_mod.` prefixes DDP and torch.compile add."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}; "
                        f"pass model.state_dict() or torch.load(path, map_location='cpu').")
    for entry in ("model", "state_dict"):
        if isinstance(state_dict.get(entry), Mapping):
            raise ValueError(f"this looks like a training checkpoint holding a state dict under {entry!r}, not a "
                             f"state dict itself: pass checkpoint[{entry!r}].")
    result = dict(state_dict)
    while result:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(key.startswith(p) for key in result)), None)
        if prefix is None:
            break
        result = {key[len(prefix):]: tensor for key, tensor in result.items()}
    return result


def _check_vit_keys(state_dict: Mapping, source: str) -> None:
    """Raise a ValueError naming every key our ViT does not have and every key the state dict lacks."""
    unknown, layers = [], {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match and match.group(2) in _BLOCK_KEYS:
            layers.setdefault(int(match.group(1)), set()).add(match.group(2))
        elif key not in _TOP_LEVEL_KEYS:
            unknown.append(key)
    num_layers = max(layers, default=-1) + 1
    missing = [key for key in _TOP_LEVEL_KEYS if key not in state_dict]
    missing += [f"blocks.{i}.{name}" for i in range(num_layers) for name in _BLOCK_KEYS
                if name not in layers.get(i, ())]
    if num_layers == 0:
        missing.append("blocks.0.* (no encoder layers at all)")
    if unknown or missing:
        raise ValueError(
            f"the {source} state dict does not fit vit_helpers' ViT (class token, learned position embeddings, "
            f"pre-norm blocks with a qkv bias, a final LayerNorm and one linear head).\n"
            f"  keys it has that ViT lacks: {_some(unknown) or 'none'}\n"
            f"  keys ViT needs that it lacks: {_some(missing) or 'none'}\n"
            f"Variants such as average pooling (fc_norm), register tokens, LayerScale, a pre-logits layer or a "
            f"model without head have no counterpart here: use a plain ViT checkpoint (e.g. timm's "
            f"vit_base_patch16_224 or torchvision's vit_b_16)."
        )


def _check_square_grid(state_dict: Mapping, source: str) -> int:
    """The side of the patch grid that `pos_embed` (1, 1 + grid^2, D) was trained for."""
    num_positions = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(max(num_positions, 0))
    if grid * grid != num_positions:
        raise ValueError(
            f"the {source} pos_embed has {num_positions + 1} positions, not 1 + a square number: the checkpoint "
            f"has no position for the class token (timm's no_embed_class=True, e.g. DeiT III) or a non-square "
            f"patch grid; neither has a counterpart here."
        )
    return grid


# --------------------------------------------------------------------------------------------------------------
# timm: the same names
# --------------------------------------------------------------------------------------------------------------

def from_timm(state_dict: Mapping) -> StateDict:
    """A timm `VisionTransformer` state dict for our ViT: the same tensors under the same names, checked.

    timm's names are ours, but timm's ViT has variants ours lacks; their keys (e.g. `fc_norm.*` with
    global_pool='avg', `reg_token`, `blocks.0.ls1.gamma`) raise a ValueError that names them.
    """
    state_dict = _unwrap(state_dict)
    _check_vit_keys(state_dict, "timm")
    _check_square_grid(state_dict, "timm")
    return state_dict


def to_timm(state_dict: Mapping) -> StateDict:
    """Our state dict for timm's `VisionTransformer` (e.g. `timm.create_model("vit_base_patch16_224")`): the same
    tensors, checked, without the `module.` / `_orig_mod.` prefixes DDP and torch.compile add."""
    state_dict = _unwrap(state_dict)
    _check_vit_keys(state_dict, "vit_helpers")
    return state_dict


# --------------------------------------------------------------------------------------------------------------
# torchvision: a rename
# --------------------------------------------------------------------------------------------------------------

_TORCHVISION_TOP_LEVEL = {  # torchvision name -> ours
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}
_TORCHVISION_LAYER = {  # inside encoder.layers.encoder_layer_{i}: torchvision name -> ours inside blocks.{i}
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",  # (3D, D): W_q, W_k, W_v stacked, as in our qkv
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",  # mlp = Linear, GELU, Dropout, Linear, Dropout
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
}
_TORCHVISION_LEGACY_LAYER = {  # the MLP's names in files saved before torchvision 0.13 (its pretrained ViTs)
    "mlp.linear_1.weight": "mlp.fc1.weight",
    "mlp.linear_1.bias": "mlp.fc1.bias",
    "mlp.linear_2.weight": "mlp.fc2.weight",
    "mlp.linear_2.bias": "mlp.fc2.bias",
}
_TORCHVISION_LAYER_KEY = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_OURS_TO_TORCHVISION_TOP_LEVEL = {ours: theirs for theirs, ours in _TORCHVISION_TOP_LEVEL.items()}
_OURS_TO_TORCHVISION_LAYER = {ours: theirs for theirs, ours in _TORCHVISION_LAYER.items()}


def _torchvision_key_to_ours(key: str) -> str | None:
    if key in _TORCHVISION_TOP_LEVEL:
        return _TORCHVISION_TOP_LEVEL[key]
    match = _TORCHVISION_LAYER_KEY.match(key)
    if match:
        name = _TORCHVISION_LAYER.get(match.group(2)) or _TORCHVISION_LEGACY_LAYER.get(match.group(2))
        if name:
            return f"blocks.{match.group(1)}.{name}"
    return None


def from_torchvision(state_dict: Mapping) -> StateDict:
    """A torchvision `VisionTransformer` state dict renamed for our ViT (the same tensor objects, no copies).

    `ViT(ViTConfig.named("ViT-B/16")).load_state_dict(from_torchvision(vit_b_16().state_dict()))` loads exactly.
    A model built with `representation_size` has a Linear-tanh-Linear head (`heads.pre_logits`) that ours lacks
    and raises a ValueError; so does any other key without a counterpart (e.g. `conv_proj.conv_*` of a conv stem).
    """
    state_dict = _unwrap(state_dict)
    if any(key.startswith("heads.pre_logits.") for key in state_dict):
        raise ValueError(
            "this torchvision ViT was built with representation_size: its head is Linear -> tanh -> Linear "
            "(heads.pre_logits, heads.head), while ours is one linear layer, as the paper uses for fine-tuning. "
            "Drop the heads.pre_logits.* entries and set heads.head.weight and heads.head.bias to zeros of shapes "
            "(num_classes, hidden_dim) and (num_classes,) (the head trained on top of pre_logits means nothing "
            "without it), convert, and fine-tune, after replace_head for another number of classes "
            "(torchvision's pretrained ViTs have no pre_logits; they load as they are)."
        )
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        ours = _torchvision_key_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            converted[ours] = tensor
    if unknown:
        raise ValueError(f"torchvision keys without a counterpart in vit_helpers' ViT: {_some(unknown)}. Only a plain "
                         f"torchvision VisionTransformer converts (no conv_stem_configs, no representation_size).")
    _check_vit_keys(converted, "torchvision (after renaming)")
    _check_square_grid(converted, "torchvision")
    return converted


def to_torchvision(state_dict: Mapping) -> StateDict:
    """Our state dict renamed for torchvision's `VisionTransformer` (the same tensor objects, no copies).

    `torchvision.models.vit_b_16().load_state_dict(to_torchvision(ours.state_dict()))` loads exactly.
    """
    state_dict = _unwrap(state_dict)
    _check_vit_keys(state_dict, "vit_helpers")
    converted = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            layer, name = match.group(1), _OURS_TO_TORCHVISION_LAYER[match.group(2)]
            converted[f"encoder.layers.encoder_layer_{layer}.{name}"] = tensor
        else:
            converted[_OURS_TO_TORCHVISION_TOP_LEVEL[key]] = tensor
    return converted


# --------------------------------------------------------------------------------------------------------------
# Position embeddings for another image size, and a state dict adapted to another config
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def resample_position_embeddings(pos_embed: torch.Tensor, new_grid_size: int | tuple[int, int],
                                 num_prefix_tokens: int = 1) -> torch.Tensor:
    """Position embeddings for a patch grid of another size: (1, prefix + old^2, D) -> (1, prefix + new^2, D).

    Section 3.2 of the paper: when fine-tuning at a higher resolution "the pre-trained position embeddings may
    no longer be meaningful. We therefore perform 2D interpolation of the pre-trained position embeddings,
    according to their location in the original image." The patch positions are laid out on their grid (row
    major, as the patches are) and resized bicubically with align_corners=False and antialias=True, exactly as
    timm's `resample_abs_pos_embed`, so a checkpoint resampled here equals one timm resampled; the prefix (class
    token) positions have no grid location and are kept unchanged. Always returns a new tensor, in the input's
    dtype.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected position embeddings of shape (1, tokens, embed_dim), got {tuple(pos_embed.shape)}.")
    new_height, new_width = (new_grid_size, new_grid_size) if isinstance(new_grid_size, int) else new_grid_size
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_size = math.isqrt(grid.shape[1])
    if old_size * old_size != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]} patch positions (after {num_prefix_tokens} prefix tokens) do not form a "
                         f"square grid; check num_prefix_tokens.")
    embed_dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_size, old_size, embed_dim).permute(0, 3, 1, 2)  # (1, D, old, old): channels first
    # float32: bicubic interpolation is not implemented for half precision on every device. antialias=True also
    # when growing, as timm: PyTorch's antialiased bicubic uses PIL's kernel (a = -0.5), the plain one a = -0.75,
    # so the two differ when upsampling too, not only when shrinking.
    grid = F.interpolate(grid.float(), size=(new_height, new_width), mode="bicubic", align_corners=False,
                         antialias=True)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_height * new_width, embed_dim)
    return torch.cat([prefix, grid], dim=1)  # (1, prefix + new_height * new_width, D)


def _expected_shapes(config: ViTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {key: tensor.shape for key, tensor in ViT(config).state_dict().items()}


def _adapt(state_dict: StateDict, config: ViTConfig, replace_mismatched_head: bool) -> tuple[StateDict, list[str]]:
    """`state_dict` (our names, checked) fitted to `config`, and one line for each adaptation made."""
    expected = _expected_shapes(config)
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"the checkpoint's layers do not match the config's {config.num_layers}: missing "
                         f"{_some(missing) or 'none'}; unexpected {_some(unexpected) or 'none'}. Build the model "
                         f"from the checkpoint's own config: infer_config(state_dict).")
    adapted, report, mismatched = {}, [], []
    for key, tensor in state_dict.items():
        shape = expected[key]
        if tensor.shape == shape:
            adapted[key] = tensor
        elif key == "pos_embed" and tensor.ndim == 3 and tensor.shape[-1] == shape[-1]:
            old_grid = _check_square_grid(state_dict, "checkpoint")
            adapted[key] = resample_position_embeddings(tensor, config.grid_size)
            report.append(f"pos_embed: resampled the {old_grid}x{old_grid} patch grid to "
                          f"{config.grid_size}x{config.grid_size} (bicubic) for {config.image_size}px images; "
                          f"class token position kept")
        elif key.startswith("head.") and replace_mismatched_head and tensor.shape[1:] == shape[1:]:
            adapted[key] = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
            if key == "head.weight":
                report.append(f"head: the checkpoint's {tensor.shape[0]} classes replaced by a zero-initialised "
                              f"{shape[1]} x {shape[0]} head for {config.num_classes} classes (the paper's "
                              f"fine-tuning recipe)")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(shape)}")
    if mismatched:
        raise ValueError("cannot adapt " + "; ".join(mismatched) + ". Only the image size (position embeddings) and "
                         "the number of classes (head) can differ between a checkpoint and a model; build the model "
                         "from the checkpoint's config: infer_config(state_dict, image_size=..., num_classes=...), "
                         "and let a head of another size be zeroed with replace_mismatched_head=True (load_into does).")
    return adapted, report


def adapt_state_dict(state_dict: Mapping, config: ViTConfig, replace_mismatched_head: bool = False) -> StateDict:
    """A state dict (our/timm names) fitted to `config`: position embeddings resampled to its image size.

    With `replace_mismatched_head=True`, a head for another number of classes becomes a zero head of the config's.
    Any other difference (width, depth, patch size, ...) raises a ValueError that names the tensors. Tensors that
    fit are passed through, not copied.
    """
    adapted, _ = _adapt(from_timm(state_dict), config, replace_mismatched_head)
    return adapted


def load_into(model: ViT, state_dict: Mapping, verbose: bool = True) -> list[str]:
    """Load a checkpoint (our/timm or torchvision names) into `model`, adapting what differs only in size.

    The position embeddings are resampled to the model's image size and a head for another number of classes is
    replaced by a zero head (the paper's recipe for fine-tuning at a new resolution on a new task). Returns the
    report, one line per adaptation (printed when `verbose`); anything else that differs raises a ValueError.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ViTConfig):
        raise TypeError(f"load_into needs a vit_helpers ViT (with a .config), got {type(model).__name__}.")
    state_dict = _unwrap(state_dict)
    report = []
    if "class_token" in state_dict:  # torchvision's name for the class token
        state_dict = from_torchvision(state_dict)
        report.append("renamed torchvision's keys to ours")
    adapted, adaptations = _adapt(from_timm(state_dict), config, replace_mismatched_head=True)
    model.load_state_dict(adapted, strict=True)
    report += adaptations or [f"loaded all {len(adapted)} tensors unchanged"]
    if verbose:
        print("\n".join(report))
    return report


def replace_head(model: ViT, num_classes: int) -> ViT:
    """Give `model` a new zero-initialised head for `num_classes` classes; every other tensor is untouched.

    Section 3.2, on fine-tuning: "For this, we remove the pre-trained prediction head and attach a zero-initialized
    D x K feedforward layer, where K is the number of downstream classes." With zeros, the first logits are all equal,
    so fine-tuning starts from the pre-trained features without a random head disturbing them. Updates
    `model.config.num_classes`; returns the same model.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
    old = model.head
    head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.head = head
    model.config = dataclasses.replace(model.config, num_classes=num_classes)
    return model


# --------------------------------------------------------------------------------------------------------------
# Building a ViT from a checkpoint
# --------------------------------------------------------------------------------------------------------------

#: embed_dim -> num_heads of the paper's sizes (Table 1 and DeiT's Ti, S): the one thing a state dict cannot show.
_HEADS_BY_WIDTH = {embed_dim: num_heads for embed_dim, _, num_heads, _ in MODEL_SIZES.values()}


def infer_config(state_dict: Mapping, num_heads: int | None = None, **overrides) -> ViTConfig:
    """The ViTConfig a state dict (our/timm names) was trained with, read from its tensors' shapes.

    The number of heads leaves no trace in the shapes: pass `num_heads`, or the paper's value for the width is
    used (192 -> 3, 384 -> 6, 768 -> 12, 1024 and 1280 -> 16). `overrides` change fields afterwards, e.g.
    `image_size=384, num_classes=10` for a model that `load_into` then adapts the checkpoint to.
    """
    state_dict = from_timm(state_dict)
    embed_dim, in_channels, patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape
    if patch_height != patch_width:
        raise ValueError(f"non-square patches ({patch_height}x{patch_width}) are not supported.")
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            raise ValueError(f"embed_dim {embed_dim} is none of the paper's widths {sorted(_HEADS_BY_WIDTH)}: the "
                             f"number of heads cannot be read from a state dict, pass num_heads=.")
    grid = _check_square_grid(state_dict, "given")
    num_layers = 1 + max(int(_BLOCK_KEY.match(key).group(1)) for key in state_dict if _BLOCK_KEY.match(key))
    config = ViTConfig(image_size=grid * patch_height, patch_size=patch_height, in_channels=in_channels,
                       num_classes=state_dict["head.weight"].shape[0], embed_dim=embed_dim, num_layers=num_layers,
                       num_heads=num_heads, mlp_dim=state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    return dataclasses.replace(config, **overrides)


def _uninitialised_vit(config: ViTConfig) -> ViT:
    """A ViT whose tensors are allocated but not initialised: a strict load_state_dict fills every one."""
    with torch.device("meta"):
        model = ViT(config)
    return model.to_empty(device="cpu")


def vit_from_state_dict(state_dict: Mapping, num_heads: int | None = None, verbose: bool = True,
                        **overrides) -> ViT:
    """A ViT built for a checkpoint (our/timm or torchvision names) and loaded with it.

    `overrides` change the config first (e.g. `image_size=384, num_classes=10, dropout=0.1`); `load_into` then
    resamples the position embeddings and zeroes the head as needed and reports it. See `infer_config` for
    `num_heads`.
    """
    state_dict = _unwrap(state_dict)
    if "class_token" in state_dict:
        state_dict = from_torchvision(state_dict)
    model = _uninitialised_vit(infer_config(state_dict, num_heads, **overrides))
    load_into(model, state_dict, verbose=verbose)
    return model


def vit_from_timm(timm_model: nn.Module) -> ViT:
    """Our ViT with the weights of a timm `VisionTransformer` (e.g. `timm.create_model(name, pretrained=True)`)."""
    blocks = getattr(timm_model, "blocks", None)
    if not blocks:
        raise TypeError(f"expected a timm VisionTransformer (with .blocks), got {type(timm_model).__name__}.")
    return vit_from_state_dict(timm_model.state_dict(), num_heads=blocks[0].attn.num_heads, verbose=False)


# --------------------------------------------------------------------------------------------------------------
# torchvision's pretrained weights
# --------------------------------------------------------------------------------------------------------------

#: torchvision's builders and the paper's names for the same architectures.
TORCHVISION_ARCHS = {"vit_b_16": "ViT-B/16", "vit_b_32": "ViT-B/32", "vit_l_16": "ViT-L/16",
                     "vit_l_32": "ViT-L/32", "vit_h_14": "ViT-H/14"}


def _torchvision_weights(arch: str, weights):
    """torchvision's WeightsEnum entry for `weights` ("IMAGENET1K_V1", "DEFAULT", or an entry itself)."""
    import torchvision

    available = torchvision.models.get_model_weights(arch)
    if not isinstance(weights, str):
        if not isinstance(weights, available):  # the heads are taken from arch, so they must agree
            raise ValueError(f"{weights} are not weights for {arch}: pass the arch they belong to, e.g. "
                             f"arch='{type(weights).__name__.removesuffix('_Weights').lower()}'.")
        return weights
    name = weights.split(".")[-1]  # accepts "ViT_B_16_Weights.IMAGENET1K_V1" too
    if name not in available.__members__:
        raise ValueError(f"torchvision has no weights {weights!r} for {arch}; choose one of "
                         f"{', '.join(available.__members__)}.")
    return available[name]


def _offline_message(weights, error: BaseException) -> str:
    filename = os.path.basename(urlparse(weights.url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"could not download torchvision's {weights} weights from {weights.url} ({error}). torchvision keeps "
            f"downloaded weights in {cache}: download the file where there is internet and place it at "
            f"{cache / filename}; a file found there is used without any network access (set TORCH_HOME, or "
            f"call torch.hub.set_dir, to use another folder).")


def load_torchvision_pretrained(weights="IMAGENET1K_V1", arch: str = "vit_b_16", progress: bool = True,
                                verbose: bool = True, **overrides) -> ViT:
    """Our ViT with torchvision's pretrained weights, downloaded and cached by torchvision itself.

    `arch` is a torchvision builder name ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14") or the
    paper's name ("ViT-B/16", ...). The image size is read from the weights: the SWAG end-to-end ones are for
    384, 512 or 518 px images, the others for 224. `overrides` go to `vit_from_state_dict` (e.g.
    `num_classes=10` for a zero head, `image_size=384` to resample the position embeddings). The matching
    preprocessing is `torchvision.models.get_model_weights(arch)[weights].transforms()`. Without a network, a
    RuntimeError says where to place the file by hand.
    """
    arch = {paper: builder for builder, paper in TORCHVISION_ARCHS.items()}.get(arch, arch)
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(TORCHVISION_ARCHS)} "
                         f"(or {', '.join(TORCHVISION_ARCHS.values())}).")
    entry = _torchvision_weights(arch, weights)
    try:
        state_dict = entry.get_state_dict(progress=progress, check_hash=True)
    except OSError as error:  # urllib's URLError and HTTPError, socket and DNS errors are all OSErrors
        raise RuntimeError(_offline_message(entry, error)) from error
    num_heads = ViTConfig.named(TORCHVISION_ARCHS[arch]).num_heads
    return vit_from_state_dict(from_torchvision(state_dict), num_heads=num_heads, verbose=verbose, **overrides)


# --------------------------------------------------------------------------------------------------------------
# The official JAX checkpoints (.npz)
# --------------------------------------------------------------------------------------------------------------

_OFFICIAL_PREFIXES = ("opt/target/", "params/")  # optimizer-wrapped and Flax-variables-wrapped files


def _read_official(source) -> dict[str, np.ndarray]:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"no checkpoint file at {source}: download one of the official .npz files "
                                    f"(google-research/vision_transformer lists them, e.g. "
                                    f"gs://vit_models/imagenet21k/ViT-B_16.npz) and pass its path.")
        try:
            npz = np.load(source)  # allow_pickle=False: an .npz holds arrays only, and a pickle could run code
        except ValueError as error:
            raise ValueError(f"{source} is not an .npz file ({error}). A PyTorch checkpoint loads with "
                             f"vit_from_state_dict(torch.load(path, map_location='cpu')).") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{source} holds a single array, not the named arrays of an .npz checkpoint.")
        with npz:
            arrays = {name: npz[name] for name in npz.files}
    elif isinstance(source, Mapping):
        arrays = dict(source)
    else:
        raise TypeError(f"expected a path to an .npz file or a mapping of names to arrays, "
                        f"got {type(source).__name__}.")
    for prefix in _OFFICIAL_PREFIXES:
        if "embedding/kernel" not in arrays and f"{prefix}embedding/kernel" in arrays:
            arrays = {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}
    if "embedding/kernel" not in arrays:
        raise ValueError("no 'embedding/kernel' array: this is not an official vit_jax ViT checkpoint (a ResNet "
                         "hybrid or a big_vision checkpoint has another layout; timm.create_model loads those; a "
                         "PyTorch checkpoint loads with vit_from_state_dict(torch.load(path, map_location='cpu'))).")
    return arrays


class _OfficialArrays:
    """The arrays of an official checkpoint, handed out once each as float32 tensors, so leftovers can be named."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.remaining = arrays

    def take(self, name: str) -> torch.Tensor:
        if name not in self.remaining:
            raise ValueError(f"the checkpoint lacks {name!r}; it is not a complete official ViT checkpoint.")
        return torch.from_numpy(np.array(self.remaining.pop(name), dtype=np.float32))

    def dense(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A Flax Dense layer as (weight, bias): the kernel is (in, out), a Linear's weight (out, in)."""
        return self.take(f"{prefix}/kernel").T.contiguous(), self.take(f"{prefix}/bias")

    def layer_norm(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(f"{prefix}/scale"), self.take(f"{prefix}/bias")


def _official_block(arrays: _OfficialArrays, index: int, embed_dim: int) -> StateDict:
    """Encoder layer `index` of an official checkpoint under our names."""
    block = f"Transformer/encoderblock_{index}"
    attention = f"{block}/MultiHeadDotProductAttention_1"
    ours = f"blocks.{index}"
    tensors = {}
    tensors[f"{ours}.norm1.weight"], tensors[f"{ours}.norm1.bias"] = arrays.layer_norm(f"{block}/LayerNorm_0")
    # query, key, value kernels (D, heads, head_dim) -> (D_in, D_out) -> transposed (out, in), stacked (3D, D)
    tensors[f"{ours}.attn.qkv.weight"] = torch.cat([arrays.take(f"{attention}/{part}/kernel").reshape(embed_dim, -1).T
                                                    for part in ("query", "key", "value")])
    tensors[f"{ours}.attn.qkv.bias"] = torch.cat([  # each (heads, head_dim) -> (D,)
        arrays.take(f"{attention}/{part}/bias").reshape(embed_dim) for part in ("query", "key", "value")])
    # out kernel (heads, head_dim, D) -> (D_in, D_out) -> transposed (out, in)
    out_kernel = arrays.take(f"{attention}/out/kernel")
    tensors[f"{ours}.attn.proj.weight"] = out_kernel.reshape(embed_dim, embed_dim).T.contiguous()
    tensors[f"{ours}.attn.proj.bias"] = arrays.take(f"{attention}/out/bias")
    tensors[f"{ours}.norm2.weight"], tensors[f"{ours}.norm2.bias"] = arrays.layer_norm(f"{block}/LayerNorm_2")
    tensors[f"{ours}.mlp.fc1.weight"], tensors[f"{ours}.mlp.fc1.bias"] = arrays.dense(f"{block}/MlpBlock_3/Dense_0")
    tensors[f"{ours}.mlp.fc2.weight"], tensors[f"{ours}.mlp.fc2.bias"] = arrays.dense(f"{block}/MlpBlock_3/Dense_1")
    return tensors


def from_official_npz(source) -> tuple[StateDict, ViTConfig]:
    """Our state dict and its ViTConfig from an official google-research/vision_transformer `.npz` checkpoint.

    `source` is a path or a mapping of names to arrays (e.g. `np.load(path)`). Flax stores kernels as
    (in, out) and convolutions as HWIO; attention as (D, heads, head_dim), so unlike a PyTorch state dict the
    number of heads can be read off. The original ImageNet-21k checkpoints add a `pre_logits` layer (Linear +
    tanh) before the head; ours has none, so it is dropped with a warning, and the head trained on top of it
    is replaced by a zero head of the same size (the paper removes "the whole head" before fine-tuning).
    """
    arrays = _OfficialArrays(_read_official(source))
    num_layers = 0
    while f"Transformer/encoderblock_{num_layers}/LayerNorm_0/scale" in arrays.remaining:
        num_layers += 1
    query = arrays.remaining.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if query is None or query.ndim != 3:
        raise ValueError("expected Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel of shape "
                         "(D, heads, head_dim): this is not an official ViT checkpoint with encoder layers.")
    embed_dim, num_heads = query.shape[0], query.shape[1]
    state_dict = {"patch_embed.proj.weight": arrays.take("embedding/kernel").permute(3, 2, 0, 1).contiguous(),
                  "patch_embed.proj.bias": arrays.take("embedding/bias"),  # HWIO -> OIHW just above
                  "cls_token": arrays.take("cls"),  # (1, 1, D)
                  "pos_embed": arrays.take("Transformer/posembed_input/pos_embedding")}  # (1, 1 + N, D)
    for index in range(num_layers):
        state_dict.update(_official_block(arrays, index, embed_dim))
    state_dict["norm.weight"], state_dict["norm.bias"] = arrays.layer_norm("Transformer/encoder_norm")
    state_dict["head.weight"], state_dict["head.bias"] = arrays.dense("head")
    if "pre_logits/kernel" in arrays.remaining:
        _drop_pre_logits(arrays.remaining, state_dict)
    if arrays.remaining:
        raise ValueError(f"arrays without a counterpart in vit_helpers' ViT: {_some(arrays.remaining)}; only the "
                         f"plain ViT layout of google-research/vision_transformer converts.")
    _check_vit_keys(state_dict, "official (after conversion)")
    return state_dict, infer_config(state_dict, num_heads=num_heads)


def _drop_pre_logits(remaining: dict, state_dict: StateDict) -> None:
    representation_size = remaining.pop("pre_logits/kernel").shape[1]
    remaining.pop("pre_logits/bias", None)
    num_classes, embed_dim = state_dict["head.weight"].shape[0], state_dict["cls_token"].shape[-1]
    state_dict["head.weight"] = torch.zeros(num_classes, embed_dim)
    state_dict["head.bias"] = torch.zeros(num_classes)
    warnings.warn(f"dropped the checkpoint's pre_logits layer (Linear {embed_dim} -> {representation_size} + tanh), "
                  f"which vit_helpers' ViT does not have; the head trained on top of it is meaningless without it "
                  f"and was replaced by a zero head for {num_classes} classes. Fine-tune it, after replace_head for "
                  f"your number of classes.", UserWarning, stacklevel=3)


def vit_from_official_npz(source, verbose: bool = True, **overrides) -> ViT:
    """Our ViT loaded from an official `.npz` checkpoint; `overrides` as in `vit_from_state_dict`."""
    state_dict, config = from_official_npz(source)
    model = _uninitialised_vit(dataclasses.replace(config, **overrides))
    load_into(model, state_dict, verbose=verbose)
    return model


def to_official_arrays(state_dict: Mapping, num_heads: int) -> dict[str, np.ndarray]:
    """Our state dict as the official checkpoint's float32 arrays (names and layouts of `from_official_npz`).

    `num_heads` is needed to split the attention kernels into (D, heads, head_dim).
    """
    state_dict = to_timm(state_dict)
    embed_dim = state_dict["cls_token"].shape[-1]
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
    head_dim = embed_dim // num_heads

    def array(tensor: torch.Tensor) -> np.ndarray:
        # A copy: .numpy() of a float32 CPU parameter shares its memory, and training on would change the arrays.
        return tensor.detach().to("cpu", torch.float32).numpy().copy()

    arrays = {"embedding/kernel": array(state_dict["patch_embed.proj.weight"].permute(2, 3, 1, 0)),  # OIHW->HWIO
              "embedding/bias": array(state_dict["patch_embed.proj.bias"]),
              "cls": array(state_dict["cls_token"]),
              "Transformer/posembed_input/pos_embedding": array(state_dict["pos_embed"])}
    num_layers = 1 + max(int(_BLOCK_KEY.match(key).group(1)) for key in state_dict if _BLOCK_KEY.match(key))
    for i in range(num_layers):
        ours, block = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        arrays[f"{block}/LayerNorm_0/scale"] = array(state_dict[f"{ours}.norm1.weight"])
        arrays[f"{block}/LayerNorm_0/bias"] = array(state_dict[f"{ours}.norm1.bias"])
        weights, biases = state_dict[f"{ours}.attn.qkv.weight"].chunk(3), state_dict[f"{ours}.attn.qkv.bias"].chunk(3)
        for part, weight, bias in zip(("query", "key", "value"), weights, biases):
            arrays[f"{attention}/{part}/kernel"] = array(weight.T.reshape(embed_dim, num_heads, head_dim))
            arrays[f"{attention}/{part}/bias"] = array(bias.reshape(num_heads, head_dim))
        out_weight = state_dict[f"{ours}.attn.proj.weight"]  # (out, in) -> (in, out) -> (heads, head_dim, D)
        arrays[f"{attention}/out/kernel"] = array(out_weight.T.reshape(num_heads, head_dim, embed_dim))
        arrays[f"{attention}/out/bias"] = array(state_dict[f"{ours}.attn.proj.bias"])
        arrays[f"{block}/LayerNorm_2/scale"] = array(state_dict[f"{ours}.norm2.weight"])
        arrays[f"{block}/LayerNorm_2/bias"] = array(state_dict[f"{ours}.norm2.bias"])
        for dense, linear in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            arrays[f"{block}/MlpBlock_3/{dense}/kernel"] = array(state_dict[f"{ours}.mlp.{linear}.weight"].T)
            arrays[f"{block}/MlpBlock_3/{dense}/bias"] = array(state_dict[f"{ours}.mlp.{linear}.bias"])
    arrays["Transformer/encoder_norm/scale"] = array(state_dict["norm.weight"])
    arrays["Transformer/encoder_norm/bias"] = array(state_dict["norm.bias"])
    arrays["head/kernel"] = array(state_dict["head.weight"].T)
    arrays["head/bias"] = array(state_dict["head.bias"])
    return arrays


def to_official_npz(state_dict: Mapping, path: str | os.PathLike, num_heads: int) -> Path:
    """Write our state dict as an official vit_jax `.npz` checkpoint (atomically: a temporary file, then rename).

    The file loads with `from_official_npz`, timm's `load_pretrained` and the official JAX code. Returns the path.
    """
    arrays = to_official_arrays(state_dict, num_heads)
    with atomic_write(path) as file:  # a file object: np.savez would append ".npz" to a name
        np.savez(file, **arrays)
    return Path(path)
