"""The production preset's models at their published sizes, before a cluster sees them (bench, not CI).

Builds, from their published configs with random weights (nothing downloaded), the models the production preset names:
CLIP ViT-L/14 (clip_embed, evaluate's CLIP score), BLIP large (blip_caption), Stable Diffusion 1.5's UNet, VAE and CLIP
text encoder (encode, evaluate) and a ControlNet made from that UNet as diffusers does (evaluate). Then a few rows go
through the real stages as the pipeline runs them (`python -m components.<stage>` in each family's environment, on CPU):
hub_load -> clip_embed -> blip_caption -> conditioning (canny) -> encode at 512 px -> evaluate at 512 px. Each stage's
wall time and peak memory (its largest process, and its whole process tree) are recorded, with the bytes per row it
wrote, so a size bug or a memory blow-up shows here, not on a GPU or TPU node.

The ControlNet train step at 512 px is measured by bench/train_memory.py; its results (bench/results/train_memory.json)
are quoted here when present, not measured again.

    .venvs/vision/bin/python bench/real_sizes.py [--rows 4] [--eval-steps 2] [--models DIR]

Random weights give worst-case captions (BLIP never emits its end token early, so every caption is max_new_tokens long)
and meaningless images; the time and memory are those of the real architectures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import shutil
import sys
import time

import benchlib  # noqa: E402  (puts the repo on sys.path)
from memory import run_measured  # noqa: E402  (wall time, CPU time, largest process RSS, peak tree PSS)

# Parameter counts of the checkpoints the production preset names, to check that the configs below build the right
# sizes (counted here as unique parameters: a weight tied to another counts once). Exact for CLIP ViT-L/14, SD 1.5's
# parts and the ControlNet diffusers makes from its UNet; for BLIP large the model card's rounded 470 M, which counts
# the caption head's weight (tied to the 30524 x 768 word embeddings) a second time, checked within 1 %.
PUBLISHED = {
    "clip-vit-large-patch14": 427_616_513,
    "blip-image-captioning-large": 470_000_000 - 30524 * 768,
    "sd15/unet": 859_520_964,
    "sd15/vae": 83_653_863,
    "sd15/text_encoder": 123_060_480,
    "controlnet": 361_279_120,
}
TOLERANCE = {"blip-image-captioning-large": 0.01}

CLIP_TEXT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_VISION_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
BLIP_LARGE_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=384, patch_size=16, layer_norm_eps=1e-5)
BLIP_LARGE_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, steps_offset=1)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(root: pathlib.Path) -> dict:
    """Every model folder (built once; a folder with its `.built` marker is reused) and the parameter counts."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel, CLIPTokenizer)

    from cnpipe.embedded.tiny_models import WORDS, _clip_tokenizer_files

    counts_file = root / "parameters.json"
    if counts_file.exists() and all((root / n / ".built").exists() for n in ("clip", "blip", "sd15", "train")):
        return json.loads(counts_file.read_text())
    counts: dict = {}
    torch.manual_seed(0)

    clip_dir = root / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer_files(clip_dir)  # a character-level vocabulary: token ids index into the full-size embedding
    tokenizer = CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_config = {k: v for k, v in CLIP_TEXT_L14.items() if k != "projection_dim"}
    vision_config = {k: v for k, v in CLIP_VISION_L14.items() if k != "projection_dim"}
    clip = CLIPModel(CLIPConfig(text_config={**text_config, **ids}, vision_config=vision_config, projection_dim=768)).eval()
    counts["clip-vit-large-patch14"] = _params(clip)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
                  tokenizer=tokenizer).save_pretrained(clip_dir)
    del clip
    (clip_dir / ".built").write_text("")

    blip_dir = root / "blip"
    blip_dir.mkdir(parents=True, exist_ok=True)
    (blip_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]) + "\n")
    bert = BertTokenizer(str(blip_dir / "vocab.txt"), bos_token="[DEC]")
    blip = BlipForConditionalGeneration(BlipConfig(
        text_config={**BLIP_LARGE_TEXT, "bos_token_id": bert.bos_token_id, "pad_token_id": bert.pad_token_id,
                     "sep_token_id": bert.sep_token_id, "eos_token_id": bert.sep_token_id},
        vision_config=BLIP_LARGE_VISION, projection_dim=256)).eval()
    counts["blip-image-captioning-large"] = _params(blip)
    blip.save_pretrained(blip_dir, safe_serialization=True)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=bert).save_pretrained(blip_dir)
    del blip
    (blip_dir / ".built").write_text("")

    sd_dir = root / "sd15"
    vocab = root / ".sd-vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer_files(vocab)
    sd_tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config, **ids)).eval()
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    counts.update({"sd15/unet": _params(unet), "sd15/vae": _params(vae), "sd15/text_encoder": _params(text_encoder)})
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=sd_tokenizer, unet=unet,
                            scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(sd_dir, safe_serialization=True)
    shutil.rmtree(vocab)
    (sd_dir / ".built").write_text("")

    # What controlnet_train exports, as evaluate reads it: <train output>/controlnet (EMA), a finished summary.json.
    train_dir = root / "train"
    controlnet = ControlNetModel.from_unet(unet)
    counts["controlnet"] = _params(controlnet)
    controlnet.save_pretrained(train_dir / "controlnet", safe_serialization=True)
    (train_dir / "summary.json").write_text(json.dumps({"steps": 0, "note": "random ControlNet made by bench/real_sizes.py"}))
    del unet, vae, text_encoder, controlnet
    (train_dir / ".built").write_text("")
    counts_file.write_text(json.dumps(counts, indent=1))
    return counts


def seed_folder(target: pathlib.Path, rows: int, side: int = 768) -> pathlib.Path:
    """`rows` photos (the embedded seed photos, resized to side x 2/3 side so every stage works at 512 px)."""
    from PIL import Image

    assets = benchlib.ensure_assets()
    photos = [blob for name, blob in benchlib.usable_images(assets, min_side=256) if name.startswith("seeds/")]
    target.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        image = Image.open(io.BytesIO(photos[i % len(photos)])).convert("RGB").resize((side, side * 2 // 3))
        image.save(target / f"photo_{i:03d}.jpg", quality=92)
    return target


def config_for(models: pathlib.Path, seeds: pathlib.Path, root: pathlib.Path, eval_steps: int, rows: int):
    """The production preset, pointed at the models built here, local storage, CPU, canny only (pose needs people)."""
    import pipeline_configs

    return pipeline_configs.with_overrides(pipeline_configs.preset("production"), [
        f"storage.root={root}", "hub_load.kind=folder", f"hub_load.source={seeds}", "hub_load.rows_per_shard=64",
        f"clip_embed.model={models / 'clip'}", "clip_embed.device=cpu",
        f"caption.model={models / 'blip'}", "caption.device=cpu", f"caption.batch_size={rows}",
        'conditioning.types=["canny"]',
        f"base_model.path={models / 'sd15'}", "encode.device=cpu", "encode.batch_size=4", "encode.holdout_fraction=0.5",
        f"evaluate.clip_model={models / 'clip'}", "evaluate.device=cpu", f"evaluate.num_samples={max(1, rows // 2)}",
        f"evaluate.num_inference_steps={eval_steps}", "evaluate.batch_size=1",
    ])


STAGES = [  # (stage, {input: producer}) as pipeline.py wires them; blip reads clip_embed's rows (no download here)
    ("hub_load", {}),
    ("clip_embed", {"seeds": "hub_load"}),
    ("blip_caption", {"images": "clip_embed"}),
    ("conditioning", {"images": "blip_caption"}),
    ("encode", {"conditioning": "conditioning"}),
    ("evaluate", {"trained": "<train>", "conditioning": "conditioning"}),
]


def count_flops(models: pathlib.Path, resolution: int = 512, caption_tokens: int = 30) -> dict:
    """FLOPs per image of each model call the stages make, counted by torch's FlopCounterMode (2 per multiply-add, for
    matmuls, convolutions and attention) from the shapes alone: every model is built from its saved config on the
    meta device, so nothing is computed and nothing is allocated. What the README's throughput plan divides by."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    meta = torch.device("meta")

    def counted(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    def diffusers_model(cls, folder):
        with meta:
            return cls.from_config(cls.load_config(folder)).eval()

    def randn(*shape):
        return torch.randn(*shape, device=meta)

    flops = {}
    with meta:
        clip = CLIPModel(CLIPConfig.from_pretrained(models / "clip")).eval()
        blip = BlipForConditionalGeneration(BlipConfig.from_pretrained(models / "blip")).eval()
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(models / "sd15" / "text_encoder")).eval()
    flops["clip_embed: CLIP ViT-L/14 image, 224 px"] = counted(lambda: clip.get_image_features(pixel_values=randn(1, 3, 224, 224)))
    image_tokens = []
    flops["blip_caption: BLIP large vision, 384 px"] = counted(
        lambda: image_tokens.append(blip.vision_model(pixel_values=randn(1, 3, 384, 384))[0]))
    # the caption: greedy decoding with a KV cache does about the work of one causal pass over the whole caption
    flops[f"blip_caption: BLIP large text decoder, {caption_tokens}-token caption"] = counted(lambda: blip.text_decoder(
        input_ids=torch.zeros(1, caption_tokens, dtype=torch.long, device=meta),
        attention_mask=torch.ones(1, caption_tokens, dtype=torch.long, device=meta), encoder_hidden_states=image_tokens[0]))
    vae = diffusers_model(AutoencoderKL, models / "sd15" / "vae")
    flops[f"encode: SD VAE encoder, {resolution} px"] = counted(lambda: vae.encode(randn(1, 3, resolution, resolution)))
    flops[f"evaluate: SD VAE decoder, {resolution} px"] = counted(lambda: vae.decode(randn(1, 4, resolution // 8, resolution // 8)))
    flops["encode: CLIP text encoder, 77 tokens"] = counted(lambda: text(
        torch.zeros(1, 77, dtype=torch.long, device=meta), attention_mask=torch.ones(1, 77, dtype=torch.long, device=meta)))
    unet = diffusers_model(UNet2DConditionModel, models / "sd15" / "unet")
    controlnet = diffusers_model(ControlNetModel, models / "train" / "controlnet")
    latents, context, step = randn(1, 4, resolution // 8, resolution // 8), randn(1, 77, 768), torch.tensor([500], device=meta)
    flops[f"UNet forward, {resolution} px"] = counted(lambda: unet(latents, step, encoder_hidden_states=context))
    flops[f"ControlNet forward, {resolution} px"] = counted(lambda: controlnet(
        latents, step, encoder_hidden_states=context, controlnet_cond=randn(1, 3, resolution, resolution)))
    return flops


def flops_note(flops: dict, resolution: int) -> str:
    step = flops[f"UNet forward, {resolution} px"] + flops[f"ControlNet forward, {resolution} px"]
    return ("FlopCounterMode on meta tensors (shapes only), 2 per multiply-add, attention included; an evaluate "
            f"denoising step is UNet + ControlNet forward ({step / 1e9:.0f} GFLOP per image, twice with guidance)")


def train_step_results():
    """What bench/train_memory.py measured for the ControlNet train step (XLA's memory analysis), quoted, not redone."""
    path = benchlib.RESULTS / "train_memory.json"
    if not path.exists():
        return "not measured here: run bench/train_memory.py"
    train = json.loads(path.read_text())
    compiled = train.get("compile") or {}
    compiled = compiled if "results" in compiled or "fits" in compiled else compiled.get("cpu", {})
    return {"from": "bench/results/train_memory.json", "created": train.get("created"),
            "per_device": [{k: r.get(k) for k in ("model", "layout", "gradient_checkpointing", "per_device_batch", "total_bytes")}
                           for r in compiled.get("results", [])],
            "fits": compiled.get("fits")}


def data_bytes(uri: str) -> int:
    folder = pathlib.Path(uri) / "data"
    return sum(p.stat().st_size for p in folder.rglob("*.parquet")) if folder.exists() else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=2, help="evaluate.num_inference_steps (30 in production)")
    parser.add_argument("--models", type=pathlib.Path, default=benchlib.REPO / ".cache" / "real-sizes" / "models")
    parser.add_argument("--work", type=pathlib.Path, default=benchlib.REPO / ".cache" / "real-sizes" / "run")
    parser.add_argument("--flops-only", action="store_true",
                        help="count the FLOPs again and update them in bench/results/real_sizes.json (no stage runs)")
    args = parser.parse_args(argv)
    if args.flops_only:
        path = benchlib.RESULTS / "real_sizes.json"
        payload = json.loads(path.read_text())
        payload["flops_per_image"] = count_flops(args.models, payload["resolution"], 30)
        payload["flops_counted"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        payload["train_step"] = train_step_results()
        payload["flops_note"] = flops_note(payload["flops_per_image"], payload["resolution"])
        path.write_text(json.dumps(payload, indent=1))
        for name, value in payload["flops_per_image"].items():
            print(f"{name}: {value / 1e9:.1f} GFLOP")
        return 0

    from cnpipe.dataset import load_output
    from components.registry import stage_command

    started = time.perf_counter()
    counts = build_models(args.models)
    print(f"models ready in {time.perf_counter() - started:.0f} s: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()),
          file=sys.stderr, flush=True)
    mismatched = {k: (v, PUBLISHED[k]) for k, v in counts.items() if abs(v - PUBLISHED[k]) > TOLERANCE.get(k, 0) * PUBLISHED[k]}
    shutil.rmtree(args.work, ignore_errors=True)
    seeds = seed_folder(args.work / "seeds", args.rows)
    root = args.work / "out"
    config = config_for(args.models, seeds, root, args.eval_steps, args.rows)
    env = {**os.environ, "PYTHONPATH": str(benchlib.REPO), "GLOG_minloglevel": "2"}
    env.pop("CNPIPE_FAMILY", None)
    measured = {}
    for stage, inputs in STAGES:
        uris = {name: str(args.models / "train") if producer == "<train>" else str(root / producer)
                for name, producer in inputs.items()}
        out = str(root / stage)
        result = run_measured(stage_command(stage, config.to_json(), uris, out), env, args.work / f"{stage}.log")
        output = load_output(out)
        if hasattr(output, "rows_out"):
            result.update(rows_in=output.rows_in, rows_out=output.rows_out,
                          bytes_per_row=round(data_bytes(out) / max(1, output.rows_out)))
        elif "types" in output.summary:
            canny = output.summary["types"]["canny"]
            result.update(rows_in=canny["rows_in"], rows_out=canny["rows_out"],
                          bytes_per_row=round(data_bytes(canny["uri"]) / max(1, canny["rows_out"])))
        else:
            result.update(samples=output.summary.get("samples"), steps=args.eval_steps,
                          metrics={k: v for k, v in (output.summary.get("metrics") or {}).items() if isinstance(v, float)})
        measured[stage] = result
        print(f"  {stage}: {result}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    flops = count_flops(args.models, config.encode.resolution, config.caption.max_new_tokens)
    for name, value in flops.items():
        print(f"  {name}: {value / 1e9:.1f} GFLOP", file=sys.stderr)
    print(f"  (counted in {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    payload = {
        "name": "real_sizes", "rows": args.rows, "resolution": config.encode.resolution, "eval_steps": args.eval_steps,
        "parameters": counts, "published_parameters": PUBLISHED, "size_mismatches": mismatched, "stages": measured,
        "flops_per_image": flops,
        "flops_note": flops_note(flops, config.encode.resolution),
        "train_step": train_step_results(),
    }
    benchlib.write_result("real_sizes", payload, ("torch", "transformers", "diffusers"))
    rows = [[stage, r.get("rows_out", r.get("samples", "")), r["seconds"], r["cpu_s"], r["max_process_mib"],
             r["tree_mib"], r.get("bytes_per_row", "")] for stage, r in measured.items()]
    benchlib.print_table(["stage", "rows", "wall s", "CPU s", "largest process MiB", "tree PSS MiB", "bytes/row"], rows)
    if mismatched:
        print(f"parameter counts differ from the published checkpoints: {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
