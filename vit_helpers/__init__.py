"""vit_helpers: the canonical code behind the notebooks that rebuild "An Image is Worth 16x16 Words" (ViT).

Modules, one per concern:
- `model`: the ViT itself, in the order of the paper's equations (Eqs. 1-4, Table 1).
- `weights`: conversion to and from torchvision, timm and the official JAX checkpoints; pretrained loading.
- `datasets`: the datasets on disk: the shipped sample, Animals-10 from Kaggle, CIFAR-10 (download, prepare, names).
- `data`: from an image folder to batches: reading images, transforms, splits and the data loaders.
- `gpu_data`: the fast path: images decoded once, kept on the GPU and augmented there.
- `training`: the training engine (`fit`), checkpoints, multi-GPU; `recipes`: named configurations.
- `plots`: training figures (curves, confusion matrix, predictions).
- `analysis`: looking inside a trained ViT (attention maps, rollout, Figure 7).
- `bench`: throughput and MFU against timm and torchvision.
- `python -m vit_helpers`: the command line (`cli`: train, bench, download).
"""

from vit_helpers.model import (
    MLPBlock,
    MultiheadSelfAttention,
    PatchEmbedding,
    TransformerEncoderBlock,
    ViT,
    ViTConfig,
)

__version__ = "0.1.0"

__all__ = [
    "MLPBlock",
    "MultiheadSelfAttention",
    "PatchEmbedding",
    "TransformerEncoderBlock",
    "ViT",
    "ViTConfig",
]
