"""CLIP embed and BLIP caption stages vs a plain transformers loop at batch 1, on the same images.

    PYTHONPATH=. .venvs/vision/bin/python bench/clip_blip.py [--model-size tiny|small|both] [--images N]

ours        components/clip_embed/stage.py and components/blip_caption/stage.py `run`: Parquet shards in,
            batches of clip_embed.batch_size / caption.batch_size decoded and prepared (processor) on helper
            threads a few batches ahead of the model (cnpipe/image_batches.py), commit shards out.
reference   load the same model and processor, then for every image: decode (cnpipe.images, as the stages do), processor,
            get_image_features (+ L2 normalisation) or generate(), one image at a time.
Both sides include loading the model from disk (the stage loads it in `run`); the load time alone is
reported too. The outputs are compared (embeddings within 1e-4, captions equal), so both did the same work.

Model sizes (random weights, built from configs, nothing downloaded):
  tiny    the embedded tiny CLIP/BLIP (cnpipe/embedded/tiny_models.py, 64 px, hidden 32): per-image Python
          overhead dominates, which is what batching saves.
  small   ViT 224 px / patch 16, hidden 256, 6 vision layers (CLIP text 4, BLIP decoder 4 layers): the
          model's compute matters, as with real checkpoints, so the stages run at their own default batch
          sizes (clip_embed 32, caption 16; the embedded preset's 8 suits its 15 images). Built once under
          .cache/bench/models/.
Each model size runs in a fresh process (both sides inside it), as a stage does in a pipeline.
Writes bench/results/clip_blip.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import benchlib  # noqa: E402  (puts the repo on sys.path)
from cnpipe import images  # noqa: E402  (the stages' decoder: CMYK, 16-bit and alpha made RGB the same way)

SMALL_MODELS = benchlib.REPO / ".cache" / "bench" / "models"
# images per run, by model size and stage: a small CLIP run of 144 images lasts ~3 s, short enough for this
# machine's noise to move the ratio by 20 %; BLIP's batch-1 reference is slow and its margin wide.
DEFAULT_IMAGES = {"tiny": {"clip": 480, "blip": 480}, "small": {"clip": 480, "blip": 144}}


# ---------------------------------------------------------------- the models

def build_small_clip(folder: pathlib.Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from cnpipe.embedded.tiny_models import _clip_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                           image_size=224, patch_size=16),
        projection_dim=256,
    )
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
                  tokenizer=tokenizer).save_pretrained(folder)


def build_small_blip(folder: pathlib.Path) -> None:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from cnpipe.embedded.tiny_models import WORDS

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, encoder_hidden_size=256, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                           image_size=224, patch_size=16),
        projection_dim=256,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(folder, safe_serialization=True)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tokenizer).save_pretrained(folder)


def models(size: str) -> tuple[str, str]:
    """(CLIP folder, BLIP folder) of that size, built when missing (save_pretrained, safetensors)."""
    if size == "tiny":
        from cnpipe.embedded import tiny_models

        root = benchlib.ensure_assets() / "models"
        tiny_models.ensure(str(root))
        return str(root / "tiny-clip"), str(root / "tiny-blip")
    for name, build in (("small-clip", build_small_clip), ("small-blip", build_small_blip)):
        if not (SMALL_MODELS / name / "model.safetensors").exists():
            tmp = SMALL_MODELS / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(SMALL_MODELS / name)
    return str(SMALL_MODELS / "small-clip"), str(SMALL_MODELS / "small-blip")


# ---------------------------------------------------------------- the two sides

def our_stage(module, config, manifest, root: str, name: str):
    counter = [0]

    def run():
        counter[0] += 1
        out = f"{root}/{name}-{counter[0]}"
        manifest_out = module.run(config, {"input": manifest}, out)
        column = "clip_embedding" if name == "clip" else "blip_caption"
        run.output = [v for _, t in manifest_out.iter_shards(columns=[column]) for v in t[column].to_pylist()]
        shutil.rmtree(out, ignore_errors=True)

    return run


def clip_reference(model_id: str, blobs):
    def run():
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        model = CLIPModel.from_pretrained(model_id, use_safetensors=True).eval()
        processor = CLIPImageProcessor.from_pretrained(model_id)
        out = []
        with torch.inference_mode():
            for _, blob in blobs:
                image = images.decode_rgb(blob)
                features = model.get_image_features(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
                out.append(torch.nn.functional.normalize(features, dim=-1)[0].tolist())
        run.output = out

    return run


def blip_reference(model_id: str, blobs, cfg):
    def run():
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(model_id, use_safetensors=True).eval()
        processor = AutoProcessor.from_pretrained(model_id)
        out = []
        with torch.inference_mode():
            for _, blob in blobs:
                image = images.decode_rgb(blob)
                tokens = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=cfg.max_new_tokens,
                                        num_beams=cfg.num_beams, do_sample=False)
                out.append(processor.decode(tokens[0], skip_special_tokens=True).strip())
        run.output = out

    return run


def load_seconds(model_cls, processor_cls, model_id: str) -> float:
    started = time.perf_counter()
    model_cls.from_pretrained(model_id, use_safetensors=True)
    processor_cls.from_pretrained(model_id)
    return round(time.perf_counter() - started, 3)


def bench_size(size: str, count: int, repeats: int, rows_per_shard: int, batch_size: int) -> dict:
    import numpy as np
    from transformers import AutoProcessor, BlipForConditionalGeneration, CLIPImageProcessor, CLIPModel

    import pipeline_configs
    from components.blip_caption import stage as blip_stage
    from components.clip_embed import stage as clip_stage
    from components.hub_load.stage import SEED_SCHEMA

    clip_id, blip_id = models(size)
    overrides = [f"clip_embed.model={clip_id}", f"caption.model={blip_id}"]
    if batch_size:
        overrides += [f"clip_embed.batch_size={batch_size}", f"caption.batch_size={batch_size}"]
    elif size == "small":  # stands for a real checkpoint: the stages' own default batch sizes, as in production
        overrides += [f"clip_embed.batch_size={pipeline_configs.ClipEmbedConfig().batch_size}",
                      f"caption.batch_size={pipeline_configs.CaptionConfig().batch_size}"]
    config = pipeline_configs.with_overrides(pipeline_configs.embedded(), overrides)
    counts = {"clip": count or DEFAULT_IMAGES[size]["clip"], "blip": count or DEFAULT_IMAGES[size]["blip"]}
    pool = benchlib.replicate(benchlib.usable_images(benchlib.ensure_assets()), max(counts.values()))
    print(f"[{size}] {counts} images, batch {config.clip_embed.batch_size} (clip) / {config.caption.batch_size} (blip), "
          f"{rows_per_shard} rows/shard, torch threads {__import__('torch').get_num_threads()}", file=sys.stderr)
    entry = {"images": counts, "clip_model": clip_id, "blip_model": blip_id,
             "clip_batch_size": config.clip_embed.batch_size, "blip_batch_size": config.caption.batch_size,
             "load_s": {"clip": load_seconds(CLIPModel, CLIPImageProcessor, clip_id),
                        "blip": load_seconds(BlipForConditionalGeneration, AutoProcessor, blip_id)}}
    with tempfile.TemporaryDirectory(prefix="bench-clip-blip-") as root:
        for name, module, make_reference in (("clip", clip_stage, lambda b: clip_reference(clip_id, b)),
                                             ("blip", blip_stage, lambda b: blip_reference(blip_id, b, config.caption))):
            blobs = pool[: counts[name]]
            manifest = benchlib.write_dataset(f"{root}/input-{name}", benchlib.image_rows(blobs), SEED_SCHEMA, rows_per_shard,
                                              "hub_load")
            reference = make_reference(blobs)
            print(f"[{size} {name}]", file=sys.stderr)
            ours = our_stage(module, config, manifest, root, name)
            seconds = benchlib.interleaved({"ours": ours, "reference": reference}, repeats)
            result = {side: benchlib.summary(s, len(blobs)) for side, s in seconds.items()}
            result["ratio"] = benchlib.speed_ratio(result["ours"], result["reference"])
            if name == "clip":
                diff = float(np.abs(np.asarray(ours.output) - np.asarray(reference.output)).max())
                result["max_abs_embedding_diff"] = diff
                result["same_output"] = diff < 1e-4
            else:
                same = sum(a == b for a, b in zip(ours.output, reference.output))
                result["captions_equal"] = f"{same}/{len(blobs)}"
                result["same_output"] = same == len(blobs)
                result["mean_caption_words"] = round(sum(len(c.split()) for c in ours.output) / len(blobs), 1)
            entry[name] = result
    return entry


def bench_size_alone(*args) -> dict:
    """bench_size in a fresh process: the stage runs in a process of its own in a pipeline, and one model size's
    threads, allocations and caches must not weigh on the next size's timings (both sides run in that process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(bench_size, *args).result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=["tiny", "small", "both"], default="both")
    parser.add_argument("--images", type=int, default=0, help=f"images per run (default: {DEFAULT_IMAGES})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="the stages' batch size (default: the embedded preset's for tiny, the stages' own defaults for small)")
    args = parser.parse_args(argv)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)

    sizes = ["tiny", "small"] if args.model_size == "both" else [args.model_size]
    results = {size: bench_size_alone(size, args.images, args.repeats, args.rows_per_shard,
                                      args.batch_size) for size in sizes}
    rows = []
    for size, e in results.items():
        for name in ("clip", "blip"):
            r = e[name]
            rows.append([f"{name} {size}", e["images"][name], r["ours"]["best_per_s"], r["reference"]["best_per_s"],
                         r["ratio"]["best"], r["ratio"]["median"], "yes" if r["same_output"] else "NO"])
    print(f"\nCLIP embed / BLIP caption vs a plain transformers loop at batch 1, images/s (best of {args.repeats}), "
          "model load included on both sides; ratio = ours/reference throughput")
    benchlib.print_table(["stage / model", "images", "ours", "reference", "ratio best", "ratio median", "same output"], rows)
    import torch

    benchlib.write_result("clip_blip", {"repeats": args.repeats, "rows_per_shard": args.rows_per_shard,
                                        "torch_threads": torch.get_num_threads(), "results": results},
                          libraries=("torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
