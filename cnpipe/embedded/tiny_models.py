"""Tiny CLIP and BLIP built from configs with random weights and saved with `save_pretrained`.

They exercise exactly the code path of the real checkpoints (same classes, processors and
tokenizers, safetensors on disk) at a size that runs on two CPU cores, with no download.
"""
from __future__ import annotations

import json
import pathlib

WORDS = (
    "a an the photo picture image of with and on in at by near person man woman astronaut cat dog horse "
    "rocket coffee cup camera coins motorcycle street sky space suit flag red green blue yellow black white "
    "small large old new bright dark close up view portrait pattern texture shape circle square stripes "
    "sitting standing holding looking wearing table grass wall water light shadow"
).split()


def _clip_tokenizer_files(folder: pathlib.Path) -> None:
    """A byte-level BPE vocabulary with no merges: every character is a token, as CLIP's tokenizer expects."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_clip(folder: pathlib.Path, image_size: int = 64) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=32,
    )
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)


def build_blip(folder: pathlib.Path, image_size: int = 64) -> None:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(folder, safe_serialization=True)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)


def ensure(models_dir: str) -> None:
    root = pathlib.Path(models_dir)
    for name, build in (("tiny-clip", build_clip), ("tiny-blip", build_blip)):
        target = root / name
        if not (target / "model.safetensors").exists():
            tmp = root / f".tmp-{name}"
            build(tmp)
            tmp.rename(target)


if __name__ == "__main__":
    import sys

    ensure(sys.argv[1])
