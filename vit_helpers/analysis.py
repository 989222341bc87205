"""Looking inside a trained ViT: section 4.5 of the paper ("Inspecting Vision Transformer"), Figures 6 and 7.

    attention_maps, class_attention_map          every layer's and head's attention, drawn over the image
    attention_rollout                            Figure 6 / Appendix D.8: attention from the output token to the input
    attention_distance, mean_attention_distance  Figure 7 (right) / Figure 11: "size of attended area"
    position_embedding_similarity                Figure 7 (centre): cosine similarity of position embeddings
    patch_embedding_components                   Figure 7 (left): principal components of the embedding filters E
    plot_*                                       one matplotlib Figure for each of the above

Attention tensors follow `ViT.attention_maps`: per layer (batch, heads, tokens, tokens), row = query, column = key,
token 0 = the class token, tokens 1..N = the patches in row-major order over the (grid x grid) patch grid. The
functions below take either that list or `attention_maps`' stacked (layers, batch, heads, tokens, tokens) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from vit_helpers.model import ViT

# --------------------------------------------------------------------------------------------------------------
# Shapes shared by every analysis
# --------------------------------------------------------------------------------------------------------------


def _grid_size(num_patches: int) -> int:
    """The side of the square patch grid that holds `num_patches` patches."""
    grid = math.isqrt(num_patches)
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; these analyses expect a square image "
                         f"cut into (grid x grid) patches, with token 0 the class token.")
    return grid


def _patch_token_count(num_tokens: int) -> tuple[int, int]:
    """(class tokens to skip, grid size) for a sequence of N + 1 tokens (class token first) or of N patch tokens."""
    for num_class_tokens in (1, 0):  # N + 1 and N cannot both be squares (N >= 1), so this is unambiguous
        grid = math.isqrt(num_tokens - num_class_tokens)
        if grid > 0 and grid * grid == num_tokens - num_class_tokens:
            return num_class_tokens, grid
    raise ValueError(f"{num_tokens} tokens are neither N + 1 (class token + a square grid of patches) nor N (a "
                     f"square grid of patches); pass rows of the attention matrix or of the position embeddings.")


def _layers(attentions: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Check and return the layers of `attentions` as a list of float (batch, heads, tokens, tokens) tensors."""
    if isinstance(attentions, torch.Tensor) and attentions.ndim != 5:
        raise ValueError(f"expected attention of shape (layers, batch, heads, tokens, tokens) or a list of "
                         f"(batch, heads, tokens, tokens), got a tensor of shape {tuple(attentions.shape)}; "
                         f"wrap a single layer in a list: [attention].")
    layers = list(attentions)
    if not layers:
        raise ValueError("got no attention layers; pass ViT.attention_maps(images) or analysis.attention_maps.")
    for layer in layers:
        if layer.ndim != 4 or layer.shape[-1] != layer.shape[-2] or layer.shape != layers[0].shape:
            raise ValueError(f"every layer's attention must be (batch, heads, tokens, tokens) with the same shape, "
                             f"got {[tuple(layer.shape) for layer in layers]}.")
    if _patch_token_count(layers[0].shape[-1])[0] != 1:
        raise ValueError(f"attention over {layers[0].shape[-1]} tokens has no class token; token 0 must be the "
                         f"class token, as in ViT.attention_maps.")
    return [layer.float() for layer in layers]


# --------------------------------------------------------------------------------------------------------------
# Attention maps per layer and head
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """Every layer's and head's attention weights A = softmax(q k^T / sqrt(D_h)) (Eq. 6) for `images`.

    Returns a float tensor (layers, batch, heads, tokens, tokens): `maps[l, b, h, i, j]` is how much token i attends
    to token j in head h of layer l. The model runs in eval mode (no attention dropout) and is put back as it was.
    "Self-attention allows ViT to integrate information across the entire image even in the lowest layers."
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        maps = model.attention_maps(images.to(device))  # L x (batch, heads, tokens, tokens)
    finally:
        model.train(was_training)
    return torch.stack(maps).float()  # (layers, batch, heads, tokens, tokens)


def upsample_patch_map(patch_map: torch.Tensor, image_size: int, mode: str = "bilinear") -> torch.Tensor:
    """Stretch (..., grid, grid) patch values to (..., image_size, image_size) pixels, to lay over the image.

    "bilinear" gives the smooth maps of Figure 6; "nearest" shows each patch as a flat square.
    """
    leading, grid = patch_map.shape[:-2], patch_map.shape[-2:]
    flat = patch_map.detach().float().reshape(-1, 1, *grid)  # (maps, 1, grid, grid)
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    pixels = F.interpolate(flat, size=(image_size, image_size), mode=mode, **align)  # (maps, 1, size, size)
    return pixels.reshape(*leading, image_size, image_size)


def class_attention_map(attention_row: torch.Tensor, image_size: int | None = None,
                        mode: str = "bilinear") -> torch.Tensor:
    """The class token's attention to the patches, as a picture: (..., tokens) -> (..., grid, grid).

    `attention_row` is a row of the attention matrix, e.g. `maps[layer, image, head, 0]` (N + 1 tokens, the class
    token's own weight is dropped) or N patch weights. With `image_size`, the map is upsampled to
    (..., image_size, image_size) pixels for an overlay. "Globally, we find that the model attends to image regions
    that are semantically relevant for classification (Figure 6)."
    """
    num_class_tokens, grid = _patch_token_count(attention_row.shape[-1])
    patch_weights = attention_row.detach().float()[..., num_class_tokens:]  # (..., num_patches)
    patch_map = patch_weights.reshape(*patch_weights.shape[:-1], grid, grid)  # row-major patches -> (..., grid, grid)
    return patch_map if image_size is None else upsample_patch_map(patch_map, image_size, mode)


# --------------------------------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema, 2020): Figure 6 and Appendix D.8
# --------------------------------------------------------------------------------------------------------------


class AttentionRollout(NamedTuple):
    rollout: torch.Tensor  # (batch, tokens, tokens): row i = how much output token i draws on each input token
    class_token_map: torch.Tensor  # (batch, grid, grid): the class token's row over the patches


_HEAD_FUSIONS = {
    "mean": lambda attention: attention.mean(dim=1),  # the paper: "averaged ... across all heads"
    "max": lambda attention: attention.amax(dim=1),
    "min": lambda attention: attention.amin(dim=1),
}


def _discard_lowest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the lowest `discard_ratio` of each row's weights (attention rollout's optional denoising)."""
    num_discarded = int(attention.shape[-1] * discard_ratio)
    lowest = attention.topk(num_discarded, dim=-1, largest=False).indices  # (batch, tokens, num_discarded)
    return attention.scatter(-1, lowest, 0.0)


def attention_rollout(attentions: Sequence[torch.Tensor] | torch.Tensor, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> AttentionRollout:
    """Attention rollout, the attention "from the output token to the input space" of Figure 6.

    Appendix D.8: "we used Attention Rollout (Abnar & Zuidema, 2020). Briefly, we averaged attention weights of
    ViT-L/16 across all heads and then recursively multiplied the weight matrices of all layers. This accounts for
    the mixing of attention across tokens through all layers."

    Per layer: fuse the heads (`head_fusion` "mean" as in the paper, or "max"/"min"), optionally zero the lowest
    `discard_ratio` of each row, add the identity for the residual connection (z + MSA(z) keeps each token's own
    value) and re-normalise the rows: A_hat = (A + I) / rowsum, which is 0.5 A + 0.5 I when A's rows sum to 1.
    Then rollout = A_hat_L @ ... @ A_hat_1. Returns the (batch, tokens, tokens) rollout and the class token's row
    over the patches as a (batch, grid, grid) map.
    """
    if head_fusion not in _HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {sorted(_HEAD_FUSIONS)}, got {head_fusion!r}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio is the fraction of each row's weights to drop, in [0, 1); "
                         f"got {discard_ratio}.")
    layers = _layers(attentions)
    batch, _, tokens, _ = layers[0].shape
    identity = torch.eye(tokens, device=layers[0].device)  # (tokens, tokens)
    rollout = identity.expand(batch, tokens, tokens)
    for attention in layers:
        fused = _HEAD_FUSIONS[head_fusion](attention)  # (batch, tokens, tokens)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        with_residual = fused + identity
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        rollout = with_residual @ rollout  # this layer mixes tokens that already mix the layers below
    return AttentionRollout(rollout, class_attention_map(rollout[:, 0]))


# --------------------------------------------------------------------------------------------------------------
# Mean attention distance: Figure 7 (right), Appendix D.7, Figure 11
# --------------------------------------------------------------------------------------------------------------


def patch_distances(grid_size: int, patch_size: int) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every two patches: (num_patches, num_patches)."""
    rows, columns = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    # Patch centres, less the same half-patch offset for all of them (it cancels in the differences).
    centres = torch.stack([rows.flatten(), columns.flatten()], dim=-1).double() * patch_size  # (num_patches, 2)
    # Written out rather than torch.cdist, whose fast matmul path is not exactly 0 on the diagonal.
    return (centres[:, None] - centres[None, :]).norm(dim=-1).float()  # (num_patches, num_patches)


def attention_distance(attentions: Sequence[torch.Tensor] | torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each query patch's attention distance in pixels: (layers, batch, heads, num_patches).

    For query patch i: sum over key patches j of A_ij x |centre_i - centre_j| (pixels). Only patch tokens count:
    the class token has no place in the image, so it is dropped as query and as key, and each query's remaining
    patch-to-patch weights are re-normalised to sum to 1. Without re-normalising, a head that sends most of its
    attention to the class token would look local (small distance) although it attends nowhere in the image.
    (A choice: the paper does not say. Some reimplementations, e.g. probing-vits' `compute_mean_attention_dist`,
    drop the class token without re-normalising; their distances are smaller by each query's class-token share.)
    """
    layers = _layers(attentions)
    grid = _grid_size(layers[0].shape[-1] - 1)
    distances = patch_distances(grid, patch_size).to(layers[0].device)  # (num_patches, num_patches)
    per_layer = []
    for attention in layers:
        patch_to_patch = attention[..., 1:, 1:]  # (batch, heads, num_patches, num_patches)
        weights = patch_to_patch / patch_to_patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        per_layer.append((weights * distances).sum(dim=-1))  # (batch, heads, num_patches)
    return torch.stack(per_layer)  # (layers, batch, heads, num_patches)


def mean_attention_distance(attentions: Sequence[torch.Tensor] | torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head, (layers, heads): Figure 7 (right).

    `attention_distance` averaged over query patches and images. Figure 11: "Attention distance was computed for
    128 example images by averaging the distance between the query pixel and all other pixels, weighted by the
    attention weight." Section 4.5: "This 'attention distance' is analogous to receptive field size in CNNs. We find
    that some heads attend to most of the image already in the lowest layers ... Other attention heads have
    consistently small attention distances in the low layers ... Further, the attention distance increases with
    network depth." We measure between patch centres, which is exact at the resolution attention works at.
    """
    return attention_distance(attentions, patch_size).mean(dim=(1, 3))  # (layers, heads)


def model_mean_attention_distance(model: ViT, images: torch.Tensor | Iterable, batch_size: int = 16,
                                  progress: bool = True) -> torch.Tensor:
    """`mean_attention_distance` of `model` over many images (the paper uses 128), a batch at a time.

    `images` is a (count, channels, height, width) tensor, cut into batches of `batch_size`, or an iterable of
    batches such as a DataLoader yielding (images, labels). Returns (layers, heads), in pixels.
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    total, count = None, 0
    for batch in tqdm(batches, desc="attention distance", disable=not progress):
        if isinstance(batch, (list, tuple)):
            batch = batch[0]  # (images, labels) from a DataLoader
        batch_mean = mean_attention_distance(attention_maps(model, batch), model.config.patch_size)
        total = batch_mean * len(batch) if total is None else total + batch_mean * len(batch)
        count += len(batch)
    if count == 0:
        raise ValueError("got no images; pass a (count, channels, height, width) tensor or a non-empty DataLoader.")
    return total / count


# --------------------------------------------------------------------------------------------------------------
# Position embeddings: Figure 7 (centre)
# --------------------------------------------------------------------------------------------------------------


def position_embedding_similarity(position_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every two patches' position embeddings: (num_patches, num_patches).

    Pass `model.pos_embed` ((1, N + 1, D); the class token's embedding is dropped) or (N, D). Figure 7 (centre):
    "Tiles show the cosine similarity between the position embedding of the patch with the indicated row and column
    and the position embeddings of all other patches." Section 4.5: "the model learns to encode distance within the
    image in the similarity of position embeddings, i.e. closer patches tend to have more similar position
    embeddings. Further, the row-column structure appears; patches in the same row/column have similar embeddings."
    Reshape with `similarity_tiles` for Figure 7's grid of small maps.
    """
    embeddings = position_embeddings.detach().float()
    if embeddings.ndim == 3 and embeddings.shape[0] == 1:
        embeddings = embeddings[0]  # (tokens, embed_dim)
    if embeddings.ndim != 2:
        raise ValueError(f"expected position embeddings (1, tokens, embed_dim) or (tokens, embed_dim), got shape "
                         f"{tuple(position_embeddings.shape)}; pass model.pos_embed.")
    num_class_tokens, _ = _patch_token_count(embeddings.shape[0])
    unit = F.normalize(embeddings[num_class_tokens:], dim=-1)  # (num_patches, embed_dim), each of length 1
    return unit @ unit.T  # (num_patches, num_patches)


def similarity_tiles(similarity: torch.Tensor) -> torch.Tensor:
    """(N, N) -> (grid, grid, grid, grid): `tiles[r, c]` is the (grid, grid) map of patch (r, c)'s similarity to
    every patch, one small heat map of Figure 7 (centre)."""
    grid = _grid_size(similarity.shape[-1])
    if similarity.shape != (grid * grid, grid * grid):
        raise ValueError(f"expected a square (num_patches, num_patches) similarity, got {tuple(similarity.shape)}.")
    return similarity.reshape(grid, grid, grid, grid)  # row-major patches on both axes


# --------------------------------------------------------------------------------------------------------------
# Patch-embedding filters: Figure 7 (left)
# --------------------------------------------------------------------------------------------------------------


class FilterComponents(NamedTuple):
    images: torch.Tensor  # (k, channels, P, P), each component rescaled to [0, 1] for imshow
    components: torch.Tensor  # (k, channels, P, P), unit-length principal directions
    explained_variance_ratio: torch.Tensor  # (k,): the share of the filters' variance each component explains


def patch_embedding_components(filters: torch.Tensor, num_components: int = 28) -> FilterComponents:
    """The top principal components of the patch-embedding filters E, as pictures: Figure 7 (left).

    Pass `model.patch_embed.proj.weight`, (embed_dim, channels, P, P): each of the D rows of E is an RGB filter.
    Section 4.5: "Figure 7 (left) shows the top principal components of the the learned embedding filters. The
    components resemble plausible basis functions for a low-dimensional representation of the fine structure within
    each patch." (The figure shows 28.) PCA by SVD of the centred (D, C P^2) matrix; each component's sign is
    chosen so that its largest-magnitude entry is positive, so pictures do not flip between runs.
    """
    if filters.ndim != 4:
        raise ValueError(f"expected filters (embed_dim, channels, P, P), got shape {tuple(filters.shape)}; "
                         f"pass model.patch_embed.proj.weight.")
    embed_dim, channels, height, width = filters.shape
    flat = filters.detach().float().reshape(embed_dim, -1)  # (D, C * P * P): one filter per row
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, singular_values, directions = torch.linalg.svd(centred, full_matrices=False)  # directions: (r, C * P * P)
    if not 1 <= num_components <= directions.shape[0]:
        raise ValueError(f"num_components must be between 1 and {directions.shape[0]} for {embed_dim} filters of "
                         f"{flat.shape[1]} values, got {num_components}.")
    variance = singular_values ** 2
    components = directions[:num_components]  # (k, C * P * P)
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    components = components * torch.where(largest < 0, -1.0, 1.0)
    low, high = components.amin(dim=1, keepdim=True), components.amax(dim=1, keepdim=True)
    images = (components - low) / (high - low).clamp_min(1e-12)  # each component spans [0, 1]
    shape = (num_components, channels, height, width)
    return FilterComponents(images.reshape(shape), components.reshape(shape),
                            variance[:num_components] / variance.sum())


# --------------------------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot state, safe under the Agg backend)
# --------------------------------------------------------------------------------------------------------------


def _displayable(image: torch.Tensor):
    """(channels, height, width), any normalisation -> (height, width[, 3]) numpy array in [0, 1] for imshow."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0).squeeze(-1).numpy()  # a single channel becomes (height, width)


def _hide_ticks(axes) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_attention_grid(images: torch.Tensor, attentions: Sequence[torch.Tensor] | torch.Tensor,
                        image_index: int = 0, layers: Sequence[int] | None = None) -> Figure:
    """One image's class-token attention for every head (columns) of each layer (rows), laid over the image.

    `images` is the (batch, channels, H, W) batch that `attentions` (`attention_maps(model, images)`) came from.
    """
    all_layers = _layers(attentions)
    # Negative indices count from the last layer; normalise them (out of range still raises) for the labels.
    layers = list(range(len(all_layers))) if layers is None else [range(len(all_layers))[layer] for layer in layers]
    image = images[image_index]
    num_heads, image_size = all_layers[0].shape[1], image.shape[-1]
    figure = Figure(figsize=(1.6 * (num_heads + 1), 1.6 * len(layers)), layout="constrained")
    axes = figure.subplots(len(layers), num_heads + 1, squeeze=False)
    for row, layer in enumerate(layers):
        axes[row, 0].imshow(_displayable(image), cmap="gray")
        axes[row, 0].set_ylabel(f"layer {layer + 1}")
        heat = class_attention_map(all_layers[layer][image_index, :, 0], image_size)  # (heads, H, W)
        for head in range(num_heads):
            axes[row, head + 1].imshow(_displayable(image), cmap="gray")
            axes[row, head + 1].imshow(heat[head].cpu().numpy(), cmap="inferno", alpha=0.6)
            if row == 0:
                axes[row, head + 1].set_title(f"head {head + 1}")
    axes[0, 0].set_title("input")
    _hide_ticks(axes)
    figure.suptitle("Attention of the class token to the patches")
    return figure


def plot_attention_rollout(images: torch.Tensor, class_token_maps: torch.Tensor, max_images: int = 8) -> Figure:
    """Figure 6: each input (top row) and the input weighted by its rollout attention map (bottom row).

    `class_token_maps` is `attention_rollout(...).class_token_map`, (batch, grid, grid).
    """
    count = min(len(images), len(class_token_maps), max_images)
    figure = Figure(figsize=(2.0 * count, 4.2), layout="constrained")
    axes = figure.subplots(2, count, squeeze=False)
    masks = upsample_patch_map(class_token_maps[:count], images.shape[-1]).cpu()  # (count, H, W)
    masks = masks / masks.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # brightest patch = 1
    for column in range(count):
        picture = _displayable(images[column])
        mask = masks[column].numpy()
        axes[0, column].imshow(picture, cmap="gray")
        axes[1, column].imshow(picture * (mask[..., None] if picture.ndim == 3 else mask), cmap="gray")
    axes[0, 0].set_ylabel("Input")
    axes[1, 0].set_ylabel("Attention")
    _hide_ticks(axes)
    figure.suptitle("Attention rollout: the input weighted by the class token's attention")
    return figure


def plot_mean_attention_distance(distances: torch.Tensor, image_size: int | None = None) -> Figure:
    """Figure 7 (right): one dot per head at each layer, mean attention distance (pixels) against depth.

    `distances` is `mean_attention_distance(...)`, (layers, heads). With `image_size` the y axis spans at least
    the image.
    """
    num_layers, num_heads = distances.shape
    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    depth = torch.arange(1, num_layers + 1).numpy()
    for head in range(num_heads):
        ax.scatter(depth, distances[:, head].detach().cpu().numpy(), s=14, label=f"Head {head + 1}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    # Never below the data: a head can average more than the image side (the diagonal is sqrt(2) times longer).
    top = None if image_size is None else max(float(image_size), 1.05 * float(distances.max()))
    ax.set_ylim(0, top)
    if num_heads <= 16:
        ax.legend(fontsize="x-small", ncol=2, loc="lower right")
    figure.suptitle("Mean attention distance of each head")
    return figure


def plot_position_embedding_similarity(similarity: torch.Tensor) -> Figure:
    """Figure 7 (centre): tile (r, c) shows the cosine similarity of patch (r, c)'s position embedding to all.

    `similarity` is `position_embedding_similarity(...)`, (N, N), or its `similarity_tiles`.
    """
    tiles = similarity_tiles(similarity) if similarity.ndim == 2 else similarity
    grid = tiles.shape[0]
    figure = Figure(figsize=(6.5, 6), layout="constrained")
    axes = figure.subplots(grid, grid, squeeze=False)
    for row in range(grid):
        for column in range(grid):
            shown = axes[row, column].imshow(tiles[row, column].detach().cpu().numpy(), vmin=-1, vmax=1,
                                             cmap="viridis")
        axes[row, 0].set_ylabel(str(row + 1), rotation=0, ha="right", va="center")
    for column in range(grid):
        axes[-1, column].set_xlabel(str(column + 1))
    _hide_ticks(axes)
    figure.supxlabel("Input patch column")
    figure.supylabel("Input patch row")
    figure.colorbar(shown, ax=axes, shrink=0.8, label="Cosine similarity")
    figure.suptitle("Position embedding similarity")
    return figure


def plot_embedding_filters(components: FilterComponents | torch.Tensor, columns: int = 7) -> Figure:
    """Figure 7 (left): the principal components of the RGB embedding filters, one small picture each.

    `components` is `patch_embedding_components(...)` or its `images`, (k, channels, P, P) in [0, 1].
    """
    images = components.images if isinstance(components, FilterComponents) else components
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(1.2 * columns, 1.2 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index < len(images):
            ax.imshow(images[index].detach().cpu().permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray",
                      interpolation="nearest")
        ax.set_axis_off()
    figure.suptitle(f"RGB embedding filters (first {len(images)} principal components)")
    return figure
