"""vit_helpers.weights: conversions give the same logits as torchvision and timm, round trips are exact, the
official .npz layout matches timm's own loader, position embeddings resample sensibly, offline loading is clear.

Every source model is randomised first: torchvision and our ViT zero-initialise the head (and torchvision the
class token), so comparing freshly built models could pass without testing the head or the class token at all.
"""

import itertools
import math
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from vit_helpers.model import ViT, ViTConfig
from vit_helpers.weights import (
    adapt_state_dict,
    from_official_npz,
    from_timm,
    from_torchvision,
    infer_config,
    load_into,
    load_torchvision_pretrained,
    replace_head,
    resample_position_embeddings,
    to_official_arrays,
    to_official_npz,
    to_timm,
    to_torchvision,
    vit_from_official_npz,
    vit_from_state_dict,
    vit_from_timm,
)

timm = pytest.importorskip("timm")
from timm.models import vision_transformer as timm_vit  # noqa: E402

# A small configuration, the same in all three libraries: 32 px images, 8 px patches (a 4 x 4 grid), 2 layers.
SMALL = ViTConfig(image_size=32, patch_size=8, num_classes=10, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64)


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter and buffer of `module` at random, reproducibly.

    Weight matrices get std 1/sqrt(fan_in) rather than a tiny 0.02: activations then stay of order one, so the
    attention weights are far from uniform and a swapped q/k/v or a wrong transpose changes the logits by far
    more than the tolerance. LayerNorm weights are drawn around one, biases and tokens around zero.
    """
    generator = torch.Generator().manual_seed(seed)
    for submodule in module.modules():
        is_norm = isinstance(submodule, nn.LayerNorm)
        tensors = itertools.chain(submodule.named_parameters(recurse=False), submodule.named_buffers(recurse=False))
        for name, tensor in tensors:
            noise = torch.randn(tensor.shape, generator=generator)
            if is_norm and name == "weight":
                tensor.copy_(1 + 0.2 * noise)
            elif tensor.ndim >= 2 and tensor.shape[0] > 1:  # a Linear or Conv weight, (out, in, ...)
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            else:  # biases, LayerNorm biases, the class token and position embeddings (shape (1, tokens, D))
                tensor.copy_(0.5 * noise)
    return module.eval()


def images(size: int, batch: int = 2, seed: int = 123) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert ours.shape == reference.shape
    relative_error = (ours - reference).abs().max() / reference.abs().max()
    assert relative_error < tolerance, f"relative max error {relative_error:.2e}"


def small_torchvision(**kwargs) -> TorchvisionViT:
    settings = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)
    return TorchvisionViT(**{**settings, **kwargs})


def small_timm(**kwargs) -> nn.Module:
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    return timm_vit.VisionTransformer(**{**settings, **kwargs})


def assert_state_dicts_equal(first: dict, second: dict) -> None:
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --------------------------------------------------------------------------------------------------------------
# The full ViT-B/16 of both libraries
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_b16():
    return randomise_(torchvision.models.vit_b_16(), seed=1)


@pytest.fixture(scope="module")
def timm_b16():
    return randomise_(timm.create_model("vit_base_patch16_224", pretrained=False), seed=2)


@torch.no_grad()
def test_torchvision_vit_b_16_gives_the_same_logits(torchvision_b16):
    ours = ViT(ViTConfig.named("ViT-B/16", num_classes=1000)).eval()
    ours.load_state_dict(from_torchvision(torchvision_b16.state_dict()), strict=True)
    batch = images(224)
    assert_same_outputs(ours(batch), torchvision_b16(batch))


@torch.no_grad()
def test_timm_vit_base_patch16_224_gives_the_same_logits(timm_b16):
    ours = ViT(ViTConfig.named("ViT-B/16", num_classes=1000)).eval()
    ours.load_state_dict(from_timm(timm_b16.state_dict()), strict=True)
    batch = images(224)
    assert_same_outputs(ours(batch), timm_b16(batch))


def test_full_size_round_trips_are_exact_and_copy_nothing(torchvision_b16, timm_b16):
    torchvision_state = torchvision_b16.state_dict()
    ours = from_torchvision(torchvision_state)
    assert set(ours) == set(ViT(ViTConfig.named("ViT-B/16")).state_dict())
    back = to_torchvision(ours)
    assert_state_dicts_equal(back, torchvision_state)
    assert all(back[key] is torchvision_state[key] for key in back)  # renamed, not copied

    timm_state = timm_b16.state_dict()
    back = to_timm(from_timm(timm_state))
    assert_state_dicts_equal(back, timm_state)
    assert all(back[key] is timm_state[key] for key in back)


# --------------------------------------------------------------------------------------------------------------
# Small models: the other direction, round trips, and the errors
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_our_weights_give_the_same_logits_in_torchvision_and_timm():
    ours = randomise_(ViT(SMALL), seed=3)
    torchvision_model, timm_model = small_torchvision().eval(), small_timm().eval()
    torchvision_model.load_state_dict(to_torchvision(ours.state_dict()), strict=True)
    timm_model.load_state_dict(to_timm(ours.state_dict()), strict=True)
    batch = images(32, batch=4)
    assert_same_outputs(torchvision_model(batch), ours(batch))
    assert_same_outputs(timm_model(batch), ours(batch))


@torch.no_grad()
def test_small_torchvision_and_timm_models_convert_both_ways():
    torchvision_model = randomise_(small_torchvision(), seed=4)
    ours = ViT(SMALL).eval()
    ours.load_state_dict(from_torchvision(torchvision_model.state_dict()), strict=True)
    batch = images(32, batch=4)
    assert_same_outputs(ours(batch), torchvision_model(batch))

    timm_model = randomise_(small_timm(), seed=5)
    converted = vit_from_timm(timm_model).eval()
    assert converted.config == SMALL
    assert_same_outputs(converted(batch), timm_model(batch))


def test_round_trips_from_our_side_are_exact():
    state = randomise_(ViT(SMALL), seed=6).state_dict()
    assert_state_dicts_equal(from_torchvision(to_torchvision(state)), state)
    assert_state_dicts_equal(from_timm(to_timm(state)), state)
    official_state, config = from_official_npz(to_official_arrays(state, num_heads=SMALL.num_heads))
    assert_state_dicts_equal(official_state, state)
    assert config == SMALL


def test_legacy_torchvision_mlp_names_convert():
    # torchvision's pretrained files were saved before its MLP was renamed from linear_1/linear_2 to 0/3.
    state = randomise_(small_torchvision(), seed=7).state_dict()
    legacy = {key.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): value
              for key, value in state.items()}
    assert any("linear_1" in key for key in legacy)
    assert_state_dicts_equal(from_torchvision(legacy), from_torchvision(state))


def test_torchvision_pre_logits_raises_a_clear_error():
    state = small_torchvision(representation_size=16).state_dict()
    with pytest.raises(ValueError, match="representation_size"):
        from_torchvision(state)


@torch.no_grad()
def test_the_torchvision_pre_logits_advice_works():
    # The error says: drop heads.pre_logits.*, zero heads.head.* as (num_classes, hidden_dim) and (num_classes,).
    # (It used to say to drop heads.head.* too, which then failed for lack of a head.)
    source = randomise_(small_torchvision(representation_size=16), seed=12)
    with pytest.raises(ValueError, match=r"heads\.head\.weight and heads\.head\.bias to zeros"):
        from_torchvision(source.state_dict())
    state = {key: value for key, value in source.state_dict().items() if not key.startswith("heads.pre_logits.")}
    state["heads.head.weight"], state["heads.head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    ours = ViT(SMALL).eval()
    ours.load_state_dict(from_torchvision(state), strict=True)
    batch = images(32)
    x = source._process_input(batch)
    x = torch.cat([source.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    assert_same_outputs(ours.forward_features(batch)[:, 0], source.encoder(x)[:, 0])  # the backbone is kept


def test_timm_keys_we_do_not_have_are_named():
    state = small_timm(global_pool="avg").state_dict()  # average pooling: fc_norm instead of norm
    with pytest.raises(ValueError) as error:
        from_timm(state)
    assert "fc_norm.weight" in str(error.value) and "norm.weight" in str(error.value)
    state = ViT(SMALL).state_dict()
    del state["blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.bias"):
        to_timm(state)


def test_wrapper_prefixes_are_stripped_and_training_checkpoints_are_explained():
    state = ViT(SMALL).state_dict()
    wrapped = {f"module._orig_mod.{key}": value for key, value in state.items()}  # DDP around torch.compile
    assert_state_dicts_equal(from_timm(wrapped), state)
    with pytest.raises(ValueError, match=r"checkpoint\['model'\]"):
        from_timm({"model": state, "epoch": 3})


# --------------------------------------------------------------------------------------------------------------
# The official Google .npz checkpoints
# --------------------------------------------------------------------------------------------------------------

def official_layout(timm_model: nn.Module) -> dict[str, np.ndarray]:
    """The official vit_jax arrays for a timm ViT, written out here independently of vit_helpers.weights."""
    state = {key: value.detach().numpy() for key, value in timm_model.state_dict().items()}
    embed_dim = state["cls_token"].shape[-1]
    num_heads = timm_model.blocks[0].attn.num_heads
    arrays = {"embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
              "embedding/bias": state["patch_embed.proj.bias"], "cls": state["cls_token"],
              "Transformer/posembed_input/pos_embedding": state["pos_embed"],
              "Transformer/encoder_norm/scale": state["norm.weight"],
              "Transformer/encoder_norm/bias": state["norm.bias"],
              "head/kernel": state["head.weight"].T, "head/bias": state["head.bias"]}
    for i in range(len(timm_model.blocks)):
        flax, torch_ = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        query, key, value = np.split(state[torch_ + "attn.qkv.weight"], 3)
        query_bias, key_bias, value_bias = np.split(state[torch_ + "attn.qkv.bias"], 3)
        for name, weight, bias in (("query", query, query_bias), ("key", key, key_bias), ("value", value, value_bias)):
            arrays[f"{flax}MultiHeadDotProductAttention_1/{name}/kernel"] = weight.T.reshape(embed_dim, num_heads, -1)
            arrays[f"{flax}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(num_heads, -1)
        proj = state[torch_ + "attn.proj.weight"]
        arrays[f"{flax}MultiHeadDotProductAttention_1/out/kernel"] = proj.T.reshape(num_heads, -1, embed_dim)
        arrays[f"{flax}MultiHeadDotProductAttention_1/out/bias"] = state[torch_ + "attn.proj.bias"]
        for flax_norm, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{flax}{flax_norm}/scale"] = state[f"{torch_}{norm}.weight"]
            arrays[f"{flax}{flax_norm}/bias"] = state[f"{torch_}{norm}.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            arrays[f"{flax}MlpBlock_3/{dense}/kernel"] = state[f"{torch_}mlp.{fc}.weight"].T
            arrays[f"{flax}MlpBlock_3/{dense}/bias"] = state[f"{torch_}mlp.{fc}.bias"]
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


@pytest.fixture
def timm_small_and_npz(tmp_path):
    timm_model = randomise_(small_timm(), seed=8)
    path = tmp_path / "ViT-small.npz"
    np.savez(path, **official_layout(timm_model))
    return timm_model, path


@torch.no_grad()
def test_official_npz_gives_the_same_logits(timm_small_and_npz):
    timm_model, path = timm_small_and_npz
    state, config = from_official_npz(path)
    assert config == SMALL  # heads read from the (D, heads, head_dim) kernels, sizes from the shapes
    ours = ViT(config).eval()
    ours.load_state_dict(state, strict=True)
    batch = images(32, batch=4)
    assert_same_outputs(ours(batch), timm_model(batch))
    assert_same_outputs(vit_from_official_npz(path, verbose=False).eval()(batch), timm_model(batch))


@torch.no_grad()
def test_the_npz_fixture_has_the_official_layout_according_to_timm(timm_small_and_npz):
    load_official = getattr(timm_vit, "_load_weights", None)  # timm's own reader of the official files
    if load_official is None:
        pytest.skip("this timm has no _load_weights")
    timm_model, path = timm_small_and_npz
    fresh = small_timm()
    load_official(fresh, str(path))
    assert_state_dicts_equal(fresh.state_dict(), timm_model.state_dict())


def test_official_writer_matches_the_fixture_and_writes_atomically(timm_small_and_npz):
    timm_model, path = timm_small_and_npz
    expected = dict(np.load(path))
    written = to_official_arrays(from_timm(timm_model.state_dict()), num_heads=4)
    assert set(written) == set(expected)
    for name in expected:
        assert written[name].shape == expected[name].shape, name
        assert np.array_equal(written[name], expected[name]), name
    out = to_official_npz(timm_model.state_dict(), path.parent / "exported.npz", num_heads=4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ViT-small.npz", "exported.npz"]  # no temp files
    assert_state_dicts_equal(from_official_npz(out)[0], from_official_npz(path)[0])


@torch.no_grad()
def test_official_pre_logits_is_dropped_with_a_warning(timm_small_and_npz):
    timm_model, path = timm_small_and_npz
    arrays = dict(np.load(path))
    generator = np.random.default_rng(0)
    arrays["pre_logits/kernel"] = generator.standard_normal((32, 32)).astype(np.float32)
    arrays["pre_logits/bias"] = generator.standard_normal(32).astype(np.float32)
    with pytest.warns(UserWarning, match="pre_logits"):
        state, config = from_official_npz(arrays)
    assert not any("pre_logits" in key for key in state)
    assert torch.equal(state["head.weight"], torch.zeros(10, 32)) and torch.equal(state["head.bias"], torch.zeros(10))
    ours = ViT(config).eval()
    ours.load_state_dict(state, strict=True)
    batch = images(32)
    assert_same_outputs(ours.forward_features(batch), timm_model.forward_features(batch))


def test_official_npz_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="download one of the official .npz files"):
        from_official_npz(tmp_path / "ViT-B_16.npz")
    legacy_pickle = tmp_path / "model.pth"  # a PyTorch file saved in the old pickle format
    torch.save(ViT(SMALL).state_dict(), legacy_pickle, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not an .npz file.*vit_from_state_dict"):
        from_official_npz(legacy_pickle)
    zipped = tmp_path / "model.pt"  # the current zip format, which np.load opens as an archive
    torch.save(ViT(SMALL).state_dict(), zipped)
    with pytest.raises(ValueError, match="embedding/kernel.*vit_from_state_dict"):
        from_official_npz(zipped)


def test_unknown_official_arrays_are_named(timm_small_and_npz):
    _, path = timm_small_and_npz
    arrays = dict(np.load(path), **{"conv_root/kernel": np.zeros((7, 7, 3, 64), np.float32)})  # a ResNet hybrid
    with pytest.raises(ValueError, match="conv_root/kernel"):
        from_official_npz(arrays)


# --------------------------------------------------------------------------------------------------------------
# Position embeddings for another image size
# --------------------------------------------------------------------------------------------------------------

def test_resampling_keeps_the_class_token_and_gives_the_right_shapes():
    pos_embed = torch.randn(1, 1 + 4 * 4, 8, generator=torch.Generator().manual_seed(0))
    for new_grid in (6, 2):  # growing, and shrinking (antialiased)
        resampled = resample_position_embeddings(pos_embed, new_grid)
        assert resampled.shape == (1, 1 + new_grid ** 2, 8)
        assert torch.equal(resampled[:, :1], pos_embed[:, :1])
    with pytest.raises(ValueError, match="square"):
        resample_position_embeddings(pos_embed[:, :-1], 6)


@pytest.mark.parametrize("new_grid", [9, 3, (7, 9), (6, 4), (2, 7), (5, 5)])
def test_resampling_equals_timms_resample_abs_pos_embed(new_grid):
    # Growing, shrinking, non-square and mixed. Resampling used to be antialiased only when shrinking; PyTorch's
    # antialiased bicubic has another kernel (a = -0.5, not -0.75), so growing differed from timm's.
    from timm.layers import resample_abs_pos_embed

    pos_embed = torch.randn(1, 1 + 5 * 5, 8, generator=torch.Generator().manual_seed(2))
    size = [new_grid] * 2 if isinstance(new_grid, int) else list(new_grid)
    expected = resample_abs_pos_embed(pos_embed, size, num_prefix_tokens=1)
    resampled = resample_position_embeddings(pos_embed, new_grid)
    assert resampled.shape == expected.shape
    assert (resampled - expected).abs().max() < 1e-6


def test_resampling_to_the_same_grid_is_the_identity():
    pos_embed = torch.randn(1, 1 + 14 * 14, 16, generator=torch.Generator().manual_seed(1))
    resampled = resample_position_embeddings(pos_embed, 14)
    assert (resampled - pos_embed).abs().max() < 1e-6


def test_a_linear_ramp_stays_a_smooth_ramp_when_upsampled():
    old, new, dim = 6, 12, 3
    rows, cols = torch.meshgrid(torch.arange(old, dtype=torch.float32), torch.arange(old, dtype=torch.float32),
                                indexing="ij")
    slopes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -2.0]])  # per channel: (row slope, column slope)
    ramp = rows[..., None] * slopes[:, 0] + cols[..., None] * slopes[:, 1]  # (old, old, dim)
    pos_embed = torch.cat([torch.zeros(1, 1, dim), ramp.reshape(1, old * old, dim)], dim=1)
    resampled = resample_position_embeddings(pos_embed, new)[0, 1:].reshape(new, new, dim)
    # Output pixel u samples the old grid at (u + 0.5) * old / new - 0.5 (align_corners=False), where the ramp
    # has a known value. The antialiased bicubic (a = -0.5) follows a linear ramp where its 4 x 4 stencil lies
    # inside the old grid, up to rounding, and up to a small error at the replicated borders.
    coordinate = (torch.arange(new, dtype=torch.float32) + 0.5) * old / new - 0.5
    expected = coordinate[:, None, None] * slopes[:, 0] + coordinate[None, :, None] * slopes[:, 1]
    inside = (coordinate.floor() >= 1) & (coordinate.floor() + 2 <= old - 1)
    scale = slopes.abs().sum(dim=1)  # per channel: how much the ramp changes per old grid step
    error = (resampled - expected).abs() / scale
    assert inside.sum() >= 4 and error[inside][:, inside].max() < 1e-5
    assert error.max() < 0.2
    # no jumps, no reversals: channel 0 rises along every column, channel 1 along every row, each step within
    # half of the even step (old / new = 0.5) of the exact ramp
    for steps in (resampled[..., 0].diff(dim=0), resampled[..., 1].diff(dim=1)):
        assert ((steps - 0.5).abs() < 0.25).all()
    assert (resampled[..., 0].diff(dim=1).abs() < 1e-6).all()  # and stays constant across it, up to rounding


@torch.no_grad()
def test_a_model_for_a_new_image_size_runs_with_resampled_embeddings():
    source = randomise_(ViT(SMALL), seed=9)
    state = source.state_dict()
    bigger = vit_from_state_dict(state, num_heads=4, image_size=48, verbose=False).eval()  # 4 x 4 grid -> 6 x 6
    assert bigger.config == ViTConfig(**{**vars(SMALL), "image_size": 48})
    assert bigger(images(48)).shape == (2, 10)
    for key, value in bigger.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, state[key]), key
    assert torch.equal(bigger.pos_embed, resample_position_embeddings(source.pos_embed, 6))

    new_task = ViT(ViTConfig(**{**vars(SMALL), "image_size": 48, "num_classes": 5}))
    report = load_into(new_task, to_torchvision(state), verbose=False)  # torchvision names are recognised
    assert any(line.startswith("pos_embed: resampled the 4x4 patch grid to 6x6") for line in report)
    assert any(line.startswith("head:") for line in report)
    assert not new_task.head.weight.any() and new_task.head.weight.shape == (5, 32)


def test_adapting_rejects_what_cannot_be_resampled():
    state = ViT(SMALL).state_dict()
    assert adapt_state_dict(state, ViTConfig(**{**vars(SMALL), "image_size": 64}))["pos_embed"].shape == (1, 65, 32)
    with pytest.raises(ValueError, match="cannot adapt"):
        adapt_state_dict(state, ViTConfig(**{**vars(SMALL), "embed_dim": 64, "image_size": 64}))
    with pytest.raises(ValueError, match="head.weight"):
        adapt_state_dict(state, ViTConfig(**{**vars(SMALL), "num_classes": 3}))
    assert adapt_state_dict(state, ViTConfig(**{**vars(SMALL), "num_classes": 3}),
                            replace_mismatched_head=True)["head.bias"].shape == (3,)
    with pytest.raises(ValueError, match="layers"):
        adapt_state_dict(state, ViTConfig(**{**vars(SMALL), "num_layers": 3}))


def test_infer_config_reads_the_shapes():
    assert infer_config(ViT(SMALL).state_dict(), num_heads=4) == SMALL
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(ViT(SMALL).state_dict())  # width 32 is none of the paper's, so the heads are unknown


# --------------------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_replace_head_gives_a_zero_head_and_keeps_everything_else():
    model = randomise_(ViT(SMALL), seed=10)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert replace_head(model, 3) is model
    assert model.config.num_classes == 3 and model.config.embed_dim == SMALL.embed_dim
    assert torch.equal(model.head.weight, torch.zeros(3, 32)) and torch.equal(model.head.bias, torch.zeros(3))
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        if not key.startswith("head."):
            assert torch.equal(after[key], before[key]), key
    assert torch.equal(model(images(32)), torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------------------
# torchvision's pretrained weights, without a network
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty torch hub cache in tmp_path and a network that refuses every connection (torch.hub's urlopen)."""
    def refuse(*args, **kwargs):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_offline_pretrained_loading_says_where_to_put_the_file(no_network):
    with pytest.raises(RuntimeError) as error:
        load_torchvision_pretrained("IMAGENET1K_V1", arch="vit_b_16", progress=False)
    message = str(error.value)
    assert "could not download" in message
    assert str(no_network / "vit_b_16-c867db91.pth") in message
    assert isinstance(error.value.__cause__, URLError)


@torch.no_grad()
def test_a_weights_file_placed_in_the_cache_is_used(no_network):
    # A tiny stand-in under the real file name, with the legacy MLP names torchvision's own files use. The loader
    # reads the sizes from the tensors and the 12 heads of ViT-B/16 from the architecture.
    reference = randomise_(TorchvisionViT(image_size=32, patch_size=16, num_layers=1, num_heads=12, hidden_dim=24,
                                          mlp_dim=48, num_classes=7), seed=11)
    legacy = {key.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): value
              for key, value in reference.state_dict().items()}
    no_network.mkdir(parents=True)
    torch.save(legacy, no_network / "vit_b_16-c867db91.pth")
    model = load_torchvision_pretrained("IMAGENET1K_V1", arch="ViT-B/16", progress=False, verbose=False).eval()
    assert model.config.num_heads == 12 and model.config.image_size == 32 and model.config.num_classes == 7
    batch = images(32)
    assert_same_outputs(model(batch), reference(batch))


def test_weights_of_another_arch_are_refused_before_downloading(no_network):
    # The heads come from arch: ViT-L weights under the default arch="vit_b_16" used to be downloaded (1.2 GB)
    # and then fail on 1024 features not divisible by 12 heads.
    with pytest.raises(ValueError, match="arch='vit_l_16'"):
        load_torchvision_pretrained(torchvision.models.ViT_L_16_Weights.IMAGENET1K_V1, progress=False)


def test_unknown_torchvision_weights_and_archs_are_explained():
    with pytest.raises(ValueError, match="IMAGENET1K_SWAG_E2E_V1"):
        load_torchvision_pretrained("IMAGENET22K", arch="vit_b_16")
    with pytest.raises(ValueError, match="vit_b_16"):
        load_torchvision_pretrained(arch="vit_q_8")


def test_exported_official_arrays_do_not_change_when_the_model_trains_on():
    model = ViT(SMALL)
    arrays = to_official_arrays(model.state_dict(), num_heads=SMALL.num_heads)
    before = {name: array.copy() for name, array in arrays.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(np.array_equal(arrays[name], before[name]) for name in arrays)
