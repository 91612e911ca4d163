"""A tiny Depth Anything (Dinov2 backbone) built from a config with random weights, saved with
save_pretrained: the embedded default and the tests run the real model class offline."""
from __future__ import annotations

import pathlib


def build(folder: pathlib.Path, image_size: int = 56) -> None:
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=image_size, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 head_hidden_size=8, reassemble_hidden_size=32, patch_size=14)
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config).eval()
    # At this size the default init lets almost no signal through the convolutional neck and head (the depth
    # comes out flat, ~1e-7); He init gives a depth map that varies with the image, like a trained model's.
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    model.head.conv3.bias.data.fill_(0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": image_size, "width": image_size}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3).save_pretrained(folder)


def ensure(models_dir: str) -> str:
    target = pathlib.Path(models_dir) / "tiny-depth"
    if not (target / "model.safetensors").exists():
        tmp = pathlib.Path(models_dir) / ".tmp-tiny-depth"
        build(tmp)
        tmp.rename(target)
    return str(target)


if __name__ == "__main__":
    import sys

    print(ensure(sys.argv[1]))
