"""The model is the paper's ViT: exact sizes, exact compute, and equal to PyTorch's own building blocks."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vit_helpers.model import (
    MLPBlock,
    MultiheadSelfAttention,
    NAMED_MODELS,
    PatchEmbedding,
    TransformerEncoderBlock,
    ViT,
    ViTConfig,
)

TINY = dict(image_size=32, num_classes=7)


def tiny_config(**overrides) -> ViTConfig:
    settings = dict(patch_size=8, embed_dim=48, num_layers=2, num_heads=3, mlp_dim=96, **TINY)
    settings.update(overrides)
    return ViTConfig(**settings)


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor a random value, so no comparison can pass because of zeros or ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- sizes: Table 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("ViT-B/16", 86_567_656),
    ("ViT-L/16", 304_326_632),
    ("ViT-H/14", 632_045_800),
])
def test_parameter_counts_with_1000_classes(name, expected):
    with torch.device("meta"):
        model = ViT(ViTConfig.named(name, num_classes=1000))
    assert model.num_parameters() == expected


@pytest.mark.parametrize("name, timm_name", [
    ("ViT-B/16", "vit_base_patch16_224"),
    ("ViT-L/16", "vit_large_patch16_224"),
    ("ViT-H/14", "vit_huge_patch14_224"),
    ("ViT-Ti/16", "vit_tiny_patch16_224"),
    ("ViT-S/16", "vit_small_patch16_224"),
    ("ViT-B/32", "vit_base_patch32_224"),
    ("ViT-L/32", "vit_large_patch32_224"),
])
def test_parameter_counts_match_timm(name, timm_name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = ViT(ViTConfig.named(name, num_classes=1000))
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    # Same names and shapes too: a timm checkpoint loads by name alone.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_named_presets_and_default_patch_sizes():
    assert ViTConfig.named("ViT-B") == ViTConfig.named("ViT-B/16")
    assert ViTConfig.named("ViT-H").patch_size == 14
    assert ViTConfig.named("vit-ti").embed_dim == 192
    small = ViTConfig.named("ViT-S/16")
    assert (small.embed_dim, small.num_layers, small.num_heads, small.mlp_dim) == (384, 12, 6, 1536)
    large = ViTConfig.named("ViT-L/32")
    assert (large.embed_dim, large.num_layers, large.num_heads, large.mlp_dim, large.patch_size) == (
        1024, 24, 16, 4096, 32)
    for name in NAMED_MODELS:
        assert ViTConfig.named(name).num_patches == (224 // ViTConfig.named(name).patch_size) ** 2


def test_named_overrides_and_bad_names():
    config = ViTConfig.named("ViT-Ti/4", image_size=32, num_classes=10, dropout=0.1)
    assert (config.patch_size, config.image_size, config.num_classes, config.num_patches) == (4, 32, 10, 64)
    with pytest.raises(ValueError, match="unknown model"):
        ViTConfig.named("ViT-XL/16")
    with pytest.raises(TypeError, match="no field"):
        ViTConfig.named("ViT-B/16", hidden_size=10)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ViTConfig.named("ViT-B/16", image_size=100)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTConfig.named("ViT-B/16", num_heads=7)


@pytest.mark.parametrize("overrides, message", [
    (dict(patch_size=0), "patch_size must be a positive integer"),  # was a ZeroDivisionError
    (dict(num_heads=0), "num_heads must be a positive integer"),  # was a ZeroDivisionError
    (dict(num_heads=5), r"choose num_heads from \[1, 2, 3, 4, 6, 8, 12, 16, 24\]"),  # says what would work
    (dict(attention_kernel="fast"), r"attention_kernel must be one of 'math', 'efficient', 'flash', 'cudnn' or None"),
])
def test_bad_configs_say_what_to_do(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("num_heads", [0, 5])
def test_attention_rejects_heads_that_do_not_divide_embed_dim(num_heads):
    with pytest.raises(ValueError, match=r"not divisible by num_heads .*choose num_heads from"):
        MultiheadSelfAttention(embed_dim=48, num_heads=num_heads)


# --- compute: 17.56 GMACs ------------------------------------------------------------------------------------

def test_vit_b16_gmacs():
    config = ViTConfig.named("ViT-B/16")
    assert round(config.forward_macs() / 1e9, 2) == 17.56
    assert round(config.forward_flops() / 1e9, 1) == 35.1
    assert round(config.training_flops() / 1e9, 1) == 105.4


def test_analytic_flops_equal_pytorchs_flop_counter():
    """The formula counts exactly the matrix products PyTorch runs (explicit attention path: plain matmuls)."""
    config = tiny_config()
    model = ViT(config).eval()
    for block in model.blocks:
        block.attn.fused = False
    images = torch.randn(3, 3, 32, 32)
    every_token = FlopCounterMode(display=False)
    with every_token, torch.no_grad():
        model.head(model.forward_features(images)[:, 0])
    assert every_token.get_total_flops() == 3 * config.forward_flops()
    # forward() skips the last layer's work on the tokens that Eq. 4 does not read, and nothing else.
    class_token_only = FlopCounterMode(display=False)
    with class_token_only, torch.no_grad():
        model(images)
    assert class_token_only.get_total_flops() == 3 * 2 * (config.forward_macs() - config.unread_macs())
    # per image, forward and backward (twice the forward) of what is counted
    assert config.executed_training_flops() == 3 * class_token_only.get_total_flops() // len(images)


def test_vit_b16_unread_share():
    config = ViTConfig.named("ViT-B/16")
    assert round(config.unread_macs() / config.forward_macs(), 3) == 0.069  # one layer in 12, less its keys/values


# --- Eq. 1: patch embedding ----------------------------------------------------------------------------------

def test_conv_patch_embedding_equals_unfold_and_linear():
    patch, channels, dim = 8, 3, 20
    embedding = randomise_(PatchEmbedding(patch, channels, dim))
    linear = nn.Linear(channels * patch * patch, dim)
    with torch.no_grad():
        linear.weight.copy_(embedding.proj.weight.reshape(dim, -1))  # E as a (D, P*P*C) matrix
        linear.bias.copy_(embedding.proj.bias)
    images = torch.randn(2, channels, 32, 48)
    patches = F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)  # (batch, N, C*P*P)
    assert patches.shape == (2, 4 * 6, channels * patch * patch)
    torch.testing.assert_close(embedding(images), linear(patches), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 30, 32), "multiples of the patch size"),
    ((2, 3, 32, 33), "multiples of the patch size"),
    ((2, 1, 32, 32), "3 channels.*in_channels=1"),
    ((3, 32, 32), "batch"),
])
def test_patch_embedding_rejects_bad_images(shape, message):
    with pytest.raises(ValueError, match=message):
        PatchEmbedding(8, 3, 16)(torch.randn(shape))


def test_integer_images_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"floating-point images, got torch.uint8.*float\(\) / 255"):
        ViT(tiny_config())(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_vit_rejects_images_of_another_size():
    model = ViT(tiny_config())
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_vit_rejects_non_square_images_with_as_many_patches():
    """16 x 64 pixels make 2 x 8 = 16 patches, as many as the 4 x 4 grid the position embeddings were built for,
    but the patches sit elsewhere: E_pos would label them wrongly, so this must not pass silently."""
    model = ViT(tiny_config())
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 16, 64))


# --- Eq. 2: multi-head self-attention -------------------------------------------------------------------------

def test_explicit_and_fused_attention_agree():
    attention = randomise_(MultiheadSelfAttention(embed_dim=48, num_heads=4)).eval()
    x = torch.randn(2, 10, 48)
    fused = attention(x)
    explicit, weights = attention(x, return_attention=True)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    assert weights.shape == (2, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
    attention.fused = False
    torch.testing.assert_close(attention(x), explicit)


def attention_ops(model, images) -> set[str]:
    """The names of the attention operators a forward and backward of `model` ran."""
    with torch.profiler.profile() as profile:
        model(images).sum().backward()
    return {event.name for event in profile.events() if "attention" in event.name}


def test_the_math_attention_kernel_runs_where_asked_and_computes_the_same_function():
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    chosen = ViT(tiny_config())  # PyTorch's choice
    expected = chosen(images)
    pytorchs = attention_ops(chosen, images)
    assert any("flash" in name for name in pytorchs), pytorchs  # on the CPU, PyTorch chooses its flash kernel
    for kernel in ("math", "cudnn"):  # cudnn is CUDA's: on the CPU, PyTorch chooses, and the model still runs
        model = ViT(tiny_config(attention_kernel=kernel))
        model.load_state_dict(chosen.state_dict())
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        ran = attention_ops(model, images)
        if kernel == "math":
            assert any("attention_math" in name for name in ran) and not any("flash" in name for name in ran), ran
        else:
            assert ran == pytorchs
    # Traced by torch.compile without a graph break, and the same logits
    torch._dynamo.reset()
    model = ViT(tiny_config(attention_kernel="math"))
    model.load_state_dict(chosen.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits = compiled(images)
    logits.sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_attention_equals_torch_multihead_attention():
    ours = randomise_(MultiheadSelfAttention(embed_dim=48, num_heads=4)).eval()
    theirs = nn.MultiheadAttention(48, 4, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)  # [W_q; W_k; W_v], the same stacking as our fused qkv
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.proj.weight)
        theirs.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 10, 48)
    expected, expected_weights = theirs(x, x, x, need_weights=True, average_attn_weights=False)
    actual, weights = ours(x, return_attention=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


# --- Eq. 3 and the encoder block ------------------------------------------------------------------------------

def test_mlp_block_is_linear_gelu_linear():
    mlp = randomise_(MLPBlock(16, 64)).eval()
    x = torch.randn(2, 5, 16)
    expected = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), expected)


def test_encoder_block_equals_torch_transformer_encoder_layer():
    ours = randomise_(TransformerEncoderBlock(embed_dim=48, num_heads=4, mlp_dim=96)).eval()
    theirs = nn.TransformerEncoderLayer(48, 4, dim_feedforward=96, dropout=0.0, activation="gelu",
                                        layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        for mine, torch_name in [
            (ours.norm1.weight, "norm1.weight"), (ours.norm1.bias, "norm1.bias"),
            (ours.attn.qkv.weight, "self_attn.in_proj_weight"), (ours.attn.qkv.bias, "self_attn.in_proj_bias"),
            (ours.attn.proj.weight, "self_attn.out_proj.weight"), (ours.attn.proj.bias, "self_attn.out_proj.bias"),
            (ours.norm2.weight, "norm2.weight"), (ours.norm2.bias, "norm2.bias"),
            (ours.mlp.fc1.weight, "linear1.weight"), (ours.mlp.fc1.bias, "linear1.bias"),
            (ours.mlp.fc2.weight, "linear2.weight"), (ours.mlp.fc2.bias, "linear2.bias"),
        ]:
            theirs.get_parameter(torch_name).copy_(mine)
    x = torch.randn(2, 10, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# --- Eqs. 1-4: the whole model --------------------------------------------------------------------------------

def test_forward_reads_the_class_token_of_the_final_layernorm():
    model = randomise_(ViT(tiny_config())).eval()
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (2, 17, 48)  # 4 x 4 patches + class token
    torch.testing.assert_close(model(images), model.head(features[:, 0]))


@pytest.mark.parametrize("fused", [True, False])
def test_class_token_only_last_layer_gives_the_same_logits_and_gradients(fused):
    """forward() computes only z_L^0 in the last layer; the logits and every gradient equal the full computation."""
    model = randomise_(ViT(tiny_config(num_layers=3)))
    for block in model.blocks:
        block.attn.fused = fused
    images = torch.randn(4, 3, 32, 32)
    weights = torch.randn(4, 7)  # a loss that weighs every logit differently

    def gradients(logits_of):
        model.zero_grad()
        logits = logits_of(images)
        (logits * weights).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fast_logits, fast = gradients(model)
    full_logits, full = gradients(lambda x: model.head(model.forward_features(x)[:, 0]))
    torch.testing.assert_close(fast_logits, full_logits, rtol=1e-5, atol=1e-5)
    assert fast.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(fast[name], full[name], rtol=1e-4, atol=1e-5, msg=name)


def test_attention_maps_one_per_layer_and_consistent_with_forward():
    model = randomise_(ViT(tiny_config())).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(images)
    assert len(maps) == 2 and all(m.shape == (2, 3, 17, 17) for m in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, 17))
    # The first layer's map recomputed by hand from z_0 and the first block's weights.
    block = model.blocks[0]
    q, k, _ = block.attn.qkv(block.norm1(model.embed(images))).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(maps[0], (q @ k.transpose(-1, -2) / 4.0).softmax(-1), rtol=1e-5, atol=1e-6)


def test_attention_maps_ignore_dropout_and_keep_the_mode():
    model = randomise_(ViT(tiny_config(dropout=0.3, attention_dropout=0.3))).train()
    images = torch.randn(2, 3, 32, 32)
    model.blocks[0].eval()  # a part kept in eval mode, as when fine-tuning with frozen layers
    in_training = model.attention_maps(images)
    assert model.training and model.blocks[1].training and not model.blocks[0].training  # put back as they were
    for ours, expected in zip(in_training, model.eval().attention_maps(images)):
        torch.testing.assert_close(ours, expected)


def test_logits_features_and_every_attention_map_equal_timms():
    """Same weights, loaded by name alone: timm's VisionTransformer gives the same logits, tokens and attention
    weights in every layer, the last included (attention_maps computes it for every token)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                                        mlp_ratio=2.0, num_classes=7).eval()
    ours = ViT(tiny_config(num_layers=3)).eval()
    ours.load_state_dict(randomise_(theirs, seed=3).state_dict(), strict=True)
    captured = []
    for block in theirs.blocks:
        block.attn.fused_attn = False  # timm's explicit path, whose attn_drop receives the attention weights
        block.attn.attn_drop.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_features = theirs.forward_features(images)
        expected_logits = theirs.forward_head(expected_features)
    assert expected_logits.abs().max() > 0.1  # not comparing zeros
    torch.testing.assert_close(ours(images), expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_features(images), expected_features, rtol=1e-5, atol=1e-5)
    maps = ours.attention_maps(images)
    assert len(maps) == len(captured) == 3
    for layer, (mine, timms) in enumerate(zip(maps, captured)):
        torch.testing.assert_close(mine, timms, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")


def test_stochastic_depth_trains_as_timms_drop_path_rate():
    """drop_path (stochastic depth): per-layer rates rising from 0 to drop_path, as timm's drop_path_rate sets them,
    and in training the very same branches dropped and rescaled: from the same weights and the same random seed,
    the same logits as timm's VisionTransformer. In eval mode nothing is dropped."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                        mlp_ratio=2.0, num_classes=7, drop_path_rate=0.6)
    ours = ViT(tiny_config(num_layers=4, drop_path=0.6))
    ours.load_state_dict(randomise_(theirs, seed=5).state_dict(), strict=True)  # the same parameters: none added
    timm_rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in theirs.blocks]
    assert [block.drop_path.p for block in ours.blocks] == pytest.approx(timm_rates) == [0, 0.2, 0.4, 0.6]
    images = torch.randn(16, 3, 32, 32)
    theirs.train(), ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = theirs(images)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    with torch.no_grad():
        kept = ours.eval()(images)
        plain = ViT(tiny_config(num_layers=4)).eval()
        plain.load_state_dict(ours.state_dict())
        torch.testing.assert_close(kept, plain(images))  # eval: every branch runs, unscaled
        torch.manual_seed(0)
        trained = ours.train()(images)
    differs = (trained - kept).abs().amax(dim=1) > 1e-4  # per image: some dropped a branch in training
    assert 0 < differs.sum() <= len(images)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop_path is a probability"):
            tiny_config(drop_path=bad)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    config = ViTConfig.named("ViT-S/16", num_classes=10)
    model = ViT(config)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    dim = config.embed_dim
    xavier_bound = math.sqrt(6 / (dim + dim))  # each of W_q, W_k, W_v is a D x D layer in the official code
    for third in model.blocks[0].attn.qkv.weight.chunk(3):
        assert third.abs().max() <= xavier_bound and third.abs().max() > 0.95 * xavier_bound
    patch_std = model.patch_embed.proj.weight.std().item()
    assert abs(patch_std - math.sqrt(1 / (3 * 16 * 16))) < 0.1 * patch_std  # LeCun normal: variance 1 / fan_in
    # A zero head makes every first prediction uniform: the loss starts at exactly log(num_classes).
    loss = F.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([1, 2]))
    assert abs(loss.item() - math.log(10)) < 1e-6


def test_timm_initialisation_draws_every_tensor_as_timms_own_model_does():
    """init="timm": parameter by parameter (the names are timm's), the same distribution as a freshly built timm
    VisionTransformer's: the same zeros and ones, the same mean and spread, within sampling error. The official
    start differs from it in most tensors (Xavier's spread, a zero head)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    theirs = dict(timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3,
                                             mlp_ratio=2.0, num_classes=10).named_parameters())
    config = ViTConfig.named("ViT-Ti/4", image_size=32, num_classes=10, num_layers=2, mlp_dim=384)

    def differences(model: ViT) -> list[str]:
        """The parameters whose mean or spread differ from timm's by more than sampling error (4 standard errors
        for the mean, 15% for the spread)."""
        found = []
        for name, mine in model.named_parameters():
            mine, other = mine.detach(), theirs[name].detach()
            spread = max(mine.std().item(), other.std().item())
            if (abs(mine.mean() - other.mean()) > 4 * spread * (2 / mine.numel()) ** 0.5 + 1e-9
                    or abs(mine.std() - other.std()) > 0.15 * spread + 1e-9):
                found.append(name)
        return found

    torch.manual_seed(1)
    assert differences(ViT(dataclasses.replace(config, init="timm"))) == []
    official = differences(ViT(config))
    assert {"head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight",
            "cls_token"} <= set(official)
    with pytest.raises(ValueError, match="init must be one of 'official', 'timm'"):
        ViTConfig(init="xavier")


def test_dropout_only_in_training():
    model = randomise_(ViT(tiny_config(dropout=0.3, attention_dropout=0.3)))
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    model.train()
    assert not torch.allclose(model(images), model(images))


def test_every_parameter_gets_a_gradient():
    model = randomise_(ViT(tiny_config()))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_compiles_as_one_graph_without_breaks():
    """torch.compile(fullgraph=True) fails on any graph break, each of which would cost speed on a GPU.
    aot_eager traces forward and backward as inductor would, without generating code (seconds, on any CPU)."""
    torch._dynamo.reset()
    model = randomise_(ViT(tiny_config()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images = torch.randn(2, 3, 32, 32)
    logits = compiled(images)
    logits.sum().backward()
    torch.testing.assert_close(logits, model(images))
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(images), model.eval()(images))
    torch._dynamo.reset()


def test_compiles_as_one_graph_with_stochastic_depth_and_dropout():
    """The regularised models the CIFAR-10 runs train (stochastic depth, dropout) also compile without a break: their
    random masks are traced, not run eagerly between graphs. Training outputs are random, so only evaluation's are
    compared."""
    torch._dynamo.reset()
    model = randomise_(ViT(tiny_config(drop_path=0.1, dropout=0.1, attention_dropout=0.1)))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images = torch.randn(4, 3, 32, 32)
    compiled(images).sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(images), model.eval()(images))
    torch._dynamo.reset()
