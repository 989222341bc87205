"""Tests for vit_helpers.analysis on hand-built attention patterns whose answers are known, then on a tiny ViT."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from vit_helpers import ViT, ViTConfig
from vit_helpers import analysis

GRID, PATCH = 4, 16  # a 64 x 64 image cut into 4 x 4 patches of 16 x 16 pixels
NUM_PATCHES, NUM_TOKENS = GRID * GRID, GRID * GRID + 1


def with_class_token(patch_attention: torch.Tensor, class_weight: float = 0.0) -> torch.Tensor:
    """(N, N) patch-to-patch rows -> (1, 1, 1, N + 1, N + 1) attention; each patch row gives `class_weight` to the
    class token and the rest in proportion to `patch_attention`; the class token's own row is uniform."""
    attention = torch.full((NUM_TOKENS, NUM_TOKENS), 1.0 / NUM_TOKENS)
    attention[1:, 0] = class_weight
    attention[1:, 1:] = (1 - class_weight) * patch_attention / patch_attention.sum(-1, keepdim=True)
    return attention[None, None, None]  # (layers, batch, heads, tokens, tokens)


def brute_force_uniform_distance() -> float:
    """Mean over query patches of the mean pixel distance to all 16 patches, summed by hand over the grid."""
    cells = list(itertools.product(range(GRID), range(GRID)))
    per_query = [np.mean([PATCH * math.hypot(r1 - r2, c1 - c2) for r2, c2 in cells]) for r1, c1 in cells]
    return float(np.mean(per_query))


def random_attention(layers=3, batch=2, heads=4, tokens=NUM_TOKENS, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, batch, heads, tokens, tokens, generator=generator).mul(3).softmax(-1)


# ------------------------------------------------------------------------------------------- attention distance

@pytest.mark.parametrize("class_weight", [0.0, 0.5])
def test_uniform_attention_gives_the_brute_force_mean_distance(class_weight):
    # Weight on the class token is dropped and the patch weights re-normalised, so 0.5 changes nothing.
    attention = with_class_token(torch.ones(NUM_PATCHES, NUM_PATCHES), class_weight)
    distance = analysis.mean_attention_distance(attention, PATCH)
    assert distance.shape == (1, 1)
    assert distance.item() == pytest.approx(brute_force_uniform_distance(), rel=1e-6)


def test_identity_attention_has_zero_distance():
    attention = torch.eye(NUM_TOKENS)[None, None, None]
    assert analysis.mean_attention_distance(attention, PATCH).item() == 0.0


def test_attending_to_the_right_neighbour_is_one_patch_away():
    right_neighbour = torch.zeros(NUM_PATCHES, NUM_PATCHES)
    for row, column in itertools.product(range(GRID), range(GRID)):
        query = row * GRID + column  # patches are row-major
        right_neighbour[query, query + 1 if column < GRID - 1 else query] = 1.0  # last column: itself
    per_query = analysis.attention_distance(with_class_token(right_neighbour), PATCH)[0, 0, 0].reshape(GRID, GRID)
    assert torch.equal(per_query[:, :-1], torch.full((GRID, GRID - 1), float(PATCH)))
    assert torch.equal(per_query[:, -1], torch.zeros(GRID))
    assert analysis.mean_attention_distance(with_class_token(right_neighbour), PATCH).item() == pytest.approx(12.0)


def test_distance_is_reported_per_layer_and_head():
    identity = with_class_token(torch.eye(NUM_PATCHES))[0, 0, 0]
    uniform = with_class_token(torch.ones(NUM_PATCHES, NUM_PATCHES))[0, 0, 0]
    layer_0 = torch.stack([identity, uniform])[None]  # (batch 1, heads 2, tokens, tokens)
    layer_1 = torch.stack([uniform, identity])[None]
    distance = analysis.mean_attention_distance([layer_0, layer_1], PATCH)
    expected = brute_force_uniform_distance()
    assert distance.shape == (2, 2)
    assert torch.allclose(distance, torch.tensor([[0.0, expected], [expected, 0.0]]))


def test_patch_distances_match_pythagoras():
    distances = analysis.patch_distances(GRID, PATCH)
    assert distances.shape == (NUM_PATCHES, NUM_PATCHES)
    assert distances[0, 1] == PATCH and distances[0, GRID] == PATCH  # right and down neighbours
    assert distances[0, NUM_PATCHES - 1] == pytest.approx(PATCH * 3 * math.sqrt(2))  # opposite corners


# ------------------------------------------------------------------------------------------- attention rollout

@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    rollout, class_map = analysis.attention_rollout(random_attention(), head_fusion, discard_ratio)
    assert rollout.shape == (2, NUM_TOKENS, NUM_TOKENS) and class_map.shape == (2, GRID, GRID)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, NUM_TOKENS), atol=1e-5)
    assert torch.equal(class_map, rollout[:, 0, 1:].reshape(2, GRID, GRID))


def test_rollout_of_identity_attention_is_the_identity():
    identity = torch.eye(NUM_TOKENS).expand(3, 2, 4, NUM_TOKENS, NUM_TOKENS)
    rollout, _ = analysis.attention_rollout(identity)
    assert torch.equal(rollout, torch.eye(NUM_TOKENS).expand(2, NUM_TOKENS, NUM_TOKENS))


def test_rollout_of_one_layer_is_half_attention_half_identity():
    attention = random_attention(layers=1)
    rollout, _ = analysis.attention_rollout(attention)
    expected = 0.5 * attention[0].mean(dim=1) + 0.5 * torch.eye(NUM_TOKENS)
    assert torch.allclose(rollout, expected / expected.sum(-1, keepdim=True), atol=1e-6)


def test_rollout_multiplies_later_layers_on_the_left():
    attention = random_attention(layers=2)
    per_layer = [0.5 * layer.mean(dim=1) + 0.5 * torch.eye(NUM_TOKENS) for layer in attention]
    rollout, _ = analysis.attention_rollout(attention)
    assert torch.allclose(rollout, per_layer[1] @ per_layer[0], atol=1e-6)


def test_rollout_follows_a_token_chain_from_the_first_layer_to_the_last():
    # Layer 1: patch b reads patch a. Layer 2: the class token reads patch b. Everything else attends to itself.
    # The final class token draws on b, which drew on a, so rollout must reach a; worked by hand with
    # A_hat = (A + I) / 2: rollout[cls] = A_hat_2[cls] @ A_hat_1 = 1/2 A_hat_1[cls] + 1/2 A_hat_1[b]
    # = 1/2 e_cls + 1/4 e_b + 1/4 e_a. The reversed product A_hat_1 @ A_hat_2 gives 1/2 e_cls + 1/2 e_b, no a.
    a, b = 1 + 0 * GRID + 0, 1 + 2 * GRID + 3  # patches (0, 0) and (2, 3)
    first, last = torch.eye(NUM_TOKENS), torch.eye(NUM_TOKENS)
    first[b] = 0.0
    first[b, a] = 1.0
    last[0] = 0.0
    last[0, b] = 1.0
    rollout, class_map = analysis.attention_rollout([first[None, None], last[None, None]])
    expected_class_row = torch.zeros(NUM_TOKENS)
    expected_class_row[[0, b, a]] = torch.tensor([0.5, 0.25, 0.25])
    assert torch.equal(rollout[0, 0], expected_class_row)
    assert class_map[0, 0, 0] == 0.25 and class_map[0, 2, 3] == 0.25 and class_map.sum() == 0.5


def test_rollout_with_max_fusion_and_discard_follows_the_definition():
    attention = random_attention(layers=1)
    fused = attention[0].amax(dim=1)  # (batch, tokens, tokens)
    threshold = fused.sort(dim=-1).values[..., 8:9]  # int(17 * 0.5) = 8 lowest of each row are dropped
    kept = torch.where(fused >= threshold, fused, 0.0) + torch.eye(NUM_TOKENS)
    rollout, _ = analysis.attention_rollout(attention, "max", discard_ratio=0.5)
    assert torch.allclose(rollout, kept / kept.sum(-1, keepdim=True), atol=1e-6)


def test_rollout_rejects_bad_options():
    with pytest.raises(ValueError, match="head_fusion"):
        analysis.attention_rollout(random_attention(), head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        analysis.attention_rollout(random_attention(), discard_ratio=1.0)
    with pytest.raises(ValueError, match="wrap a single layer"):
        analysis.attention_rollout(random_attention()[0])
    with pytest.raises(ValueError, match="square grid"):
        analysis.attention_rollout(random_attention(tokens=11))


# ------------------------------------------------------------------------------------------- class-token maps

def test_class_attention_map_places_patches_row_major():
    row = torch.zeros(NUM_TOKENS)
    row[1 + 1 * GRID + 2] = 1.0  # patch at row 1, column 2
    patch_map = analysis.class_attention_map(row)
    assert patch_map.shape == (GRID, GRID) and patch_map[1, 2] == 1.0 and patch_map.sum() == 1.0
    pixels = analysis.class_attention_map(row, image_size=GRID * PATCH, mode="nearest")
    assert pixels.shape == (64, 64)
    assert pixels[16:32, 32:48].eq(1).all() and pixels.sum() == PATCH * PATCH


# ------------------------------------------------------------------------------------------- position embeddings

def test_position_embedding_similarity_is_symmetric_with_unit_diagonal():
    position_embeddings = torch.randn(1, NUM_TOKENS, 8, generator=torch.Generator().manual_seed(1))
    similarity = analysis.position_embedding_similarity(position_embeddings)
    assert similarity.shape == (NUM_PATCHES, NUM_PATCHES)  # the class token's embedding is left out
    assert torch.allclose(similarity.diagonal(), torch.ones(NUM_PATCHES), atol=1e-6)
    assert torch.allclose(similarity, similarity.T, atol=1e-6)
    patches = position_embeddings[0, 1:]
    assert similarity[3, 10].item() == pytest.approx(torch.cosine_similarity(patches[3], patches[10], 0).item())
    tiles = analysis.similarity_tiles(similarity)
    assert tiles.shape == (GRID, GRID, GRID, GRID)
    assert tiles[0, 3, 2, 2] == similarity[3, 2 * GRID + 2]


# ------------------------------------------------------------------------------------------- PCA of the filters

def test_pca_recovers_two_orthogonal_filter_patterns():
    channels, size = 3, 4
    rows, columns = torch.meshgrid(torch.arange(size) - 1.5, torch.arange(size) - 1.5, indexing="ij")
    horizontal = columns.expand(channels, size, size).flatten()  # brightness grows to the right
    vertical = torch.stack([rows, -rows, rows]).flatten()  # green against red and blue, down the patch
    horizontal, vertical = horizontal / horizontal.norm(), vertical / vertical.norm()
    assert abs(horizontal @ vertical) < 1e-7
    # 64 filters whose coefficients on the two patterns are zero-mean and orthogonal, with variances 9 and 1.
    strong, weak = 3.0 * torch.tensor([1.0, -1.0]).repeat(32), torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(16)
    assert abs(strong @ weak) < 1e-6 and abs(weak.sum()) < 1e-6
    noise = 1e-4 * torch.randn(64, channels * size * size, generator=torch.Generator().manual_seed(2))
    # The same in every filter (the mean filter, not constant across pixels): PCA centres it away.
    shared = 5.0 + torch.rand(channels * size * size, generator=torch.Generator().manual_seed(3))
    filters = strong[:, None] * horizontal + weak[:, None] * vertical + shared + noise
    filters = filters.reshape(64, channels, size, size)  # (embed_dim, channels, P, P)

    result = analysis.patch_embedding_components(filters, num_components=2)
    assert result.components.shape == result.images.shape == (2, channels, size, size)
    assert abs(result.components[0].flatten() @ horizontal) > 0.9999  # the stronger pattern first
    assert abs(result.components[1].flatten() @ vertical) > 0.9999
    assert result.explained_variance_ratio.sum() > 0.9999
    assert result.explained_variance_ratio[0] == pytest.approx(0.9, abs=1e-3)  # variances 9 : 1
    flat_images = result.images.flatten(1)
    assert torch.allclose(flat_images.amin(1), torch.zeros(2)) and torch.allclose(flat_images.amax(1), torch.ones(2))
    with pytest.raises(ValueError, match="num_components"):
        analysis.patch_embedding_components(filters, num_components=49)


def test_pca_variance_ratio_is_of_all_the_variance_and_signs_are_fixed():
    channels, size, count = 3, 4, 64
    patterns = torch.linalg.qr(torch.randn(channels * size * size, 3, generator=torch.Generator().manual_seed(4)))[0].T
    # Zero-mean, mutually orthogonal coefficients (Walsh patterns) with variances 9, 4 and 1.
    signs = [torch.tensor([1.0] * step + [-1.0] * step).repeat(count // (2 * step)) for step in (1, 2, 4)]
    coefficients = torch.stack([3.0 * signs[0], 2.0 * signs[1], 1.0 * signs[2]], dim=1)  # (count, 3)
    filters = (coefficients @ patterns).reshape(count, channels, size, size)

    result = analysis.patch_embedding_components(filters, num_components=2)
    # Shares of the total variance (9 + 4 + 1), not of the two components kept.
    assert torch.allclose(result.explained_variance_ratio, torch.tensor([9 / 14, 4 / 14]), atol=1e-5)
    for component in result.components.flatten(1):  # the largest-magnitude entry of each is positive
        assert component[component.abs().argmax()] > 0
    flipped = analysis.patch_embedding_components(-filters, num_components=2)  # the same filters, up to sign
    assert torch.allclose(flipped.components, result.components, atol=1e-5)


# ------------------------------------------------------------------------------------------- a tiny real ViT

@pytest.fixture(scope="module")
def tiny_model_and_images():
    torch.manual_seed(0)
    config = ViTConfig.named("ViT-Ti/4", image_size=16, num_layers=2, num_classes=3, attention_dropout=0.5)
    return ViT(config), torch.randn(5, 3, 16, 16)


def test_functions_run_on_a_tiny_vit(tiny_model_and_images):
    model, images = tiny_model_and_images
    model.train()
    maps = analysis.attention_maps(model, images)
    assert model.training  # restored after running in eval mode
    assert maps.shape == (2, 5, 3, 17, 17)  # (layers, batch, heads, tokens, tokens)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 5, 3, 17), atol=1e-5)  # no attention dropout
    model.eval()
    assert torch.equal(maps, torch.stack(model.attention_maps(images)))

    assert analysis.class_attention_map(maps[0, 0, :, 0]).shape == (3, 4, 4)
    assert analysis.class_attention_map(maps[0, 0, :, 0], image_size=16).shape == (3, 16, 16)
    rollout, class_map = analysis.attention_rollout(maps)
    assert rollout.shape == (5, 17, 17) and class_map.shape == (5, 4, 4)

    distance = analysis.mean_attention_distance(maps, patch_size=4)
    assert distance.shape == (2, 3)
    assert (distance > 0).all() and (distance < 4 * 3 * math.sqrt(2)).all()
    in_batches = analysis.model_mean_attention_distance(model, images, batch_size=2, progress=False)
    assert torch.allclose(in_batches, distance, atol=1e-6)  # batches of 2, 2, 1 weighted by their size

    assert analysis.position_embedding_similarity(model.pos_embed).shape == (16, 16)
    components = analysis.patch_embedding_components(model.patch_embed.proj.weight)
    assert components.images.shape == (28, 3, 4, 4) and components.explained_variance_ratio.shape == (28,)


def test_plot_helpers_return_figures(tiny_model_and_images):
    model, images = tiny_model_and_images
    maps = analysis.attention_maps(model, images)
    figures = [
        analysis.plot_attention_grid(images, maps, image_index=1),
        analysis.plot_attention_rollout(images, analysis.attention_rollout(maps).class_token_map),
        analysis.plot_mean_attention_distance(analysis.mean_attention_distance(maps, 4), image_size=16),
        analysis.plot_position_embedding_similarity(analysis.position_embedding_similarity(model.pos_embed)),
        analysis.plot_embedding_filters(analysis.patch_embedding_components(model.patch_embed.proj.weight)),
    ]
    for figure in figures:
        assert isinstance(figure, Figure)
        figure.savefig(io.BytesIO(), format="png")  # draws every artist, so broken plotting code fails here
        assert figure.get_suptitle()
    assert len(figures[0].axes) == 2 * (3 + 1)  # layers x (input + heads)
    distance_axes = figures[2].axes[0]
    assert distance_axes.get_xlabel() == "Network depth (layer)"
    assert distance_axes.get_ylabel() == "Mean attention distance (pixels)"


def test_plot_helpers_leave_pyplot_alone(tiny_model_and_images):
    import matplotlib.pyplot as plt

    model, images = tiny_model_and_images
    maps = analysis.attention_maps(model, images)
    before = plt.get_fignums()
    analysis.plot_attention_grid(images, maps)
    analysis.plot_attention_rollout(images, analysis.attention_rollout(maps).class_token_map)
    analysis.plot_mean_attention_distance(analysis.mean_attention_distance(maps, 4))
    analysis.plot_position_embedding_similarity(analysis.position_embedding_similarity(model.pos_embed))
    analysis.plot_embedding_filters(analysis.patch_embedding_components(model.patch_embed.proj.weight))
    assert plt.get_fignums() == before  # Figure objects, not pyplot figures that pile up in a notebook


def test_attention_grid_labels_negative_layer_indices_by_their_layer(tiny_model_and_images):
    model, images = tiny_model_and_images
    figure = analysis.plot_attention_grid(images, analysis.attention_maps(model, images), layers=[-1])
    assert figure.axes[0].get_ylabel() == "layer 2"  # the last of the tiny model's 2 layers
    with pytest.raises(IndexError):
        analysis.plot_attention_grid(images, analysis.attention_maps(model, images), layers=[2])


def test_attention_distance_plot_never_hides_a_head():
    distances = torch.tensor([[10.0, 20.0], [15.0, 70.0]])  # a head beyond the 64-pixel image side
    figure = analysis.plot_mean_attention_distance(distances, image_size=64)
    bottom, top = figure.axes[0].get_ylim()
    assert bottom == 0 and top >= 70
    assert analysis.plot_mean_attention_distance(distances[:, :1], image_size=64).axes[0].get_ylim() == (0, 64)
