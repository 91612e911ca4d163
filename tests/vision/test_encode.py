"""Encode stage: the contract of its output, resume after a crash, and bad settings refused before work."""
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import model_half_data as data
from cnpipe import splits, storage
from cnpipe.dataset import ContractError, Manifest
from cnpipe.tensors import from_bf16_bytes
from components.encode import stage
from pipeline_configs import ConfigError
from tests.stage_kill import commit_markers, kill_after_commits

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return data.assets(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def conditioning(tmp_path_factory):
    return Manifest.load(data.conditioning(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def encoded(assets, conditioning, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded") / "encode"
    return stage.run(data.config(assets), {"conditioning": conditioning}, str(out))


def rows(manifest: Manifest) -> list[dict]:
    return pa.concat_tables([t for _, t in manifest.iter_shards()]).to_pylist()


def test_accounting_rejects_and_notes(encoded):
    assert (encoded.rows_in, encoded.rows_out, encoded.rows_rejected) == (data.NUM_ROWS, data.NUM_ROWS - 1, 1)
    rejected = encoded.rejected_table().to_pylist()
    assert [(r["id"], r["stage"]) for r in rejected] == [(data.CORRUPT_ID, "encode")]
    assert rejected[0]["reason"] in {"not_an_image", "corrupt_image", "truncated_image"}
    assert encoded.notes["empty_caption"] == 1
    assert encoded.arrow_schema() == stage.SCHEMA
    assert encoded.stage == "encode"


def test_rows_follow_the_contract(encoded, assets):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    base = assets / "models" / "tiny-sd"
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_model = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True).eval()
    table = rows(encoded)
    assert [r["id"] for r in table] == [f"row-{i}" for i in range(data.NUM_ROWS) if f"row-{i}" != data.CORRUPT_ID]
    uncond = storage.read_bytes(os.path.join(encoded.uri, stage.UNCOND_ENCODING))
    assert json.loads(storage.read_bytes(os.path.join(encoded.uri, stage.UNCOND_SHAPE))) == [77, 32]
    for row in table:
        assert row["split"] == ("heldout" if splits.is_heldout(row["id"], 0.4) else "train")
        assert row["control_type"] == "canny"
        image = Image.open(io.BytesIO(row["image"]))
        control = Image.open(io.BytesIO(row["control"]))
        assert image.format == control.format == "PNG" and image.size == control.size == (64, 64)
        assert control.mode == "RGB"
        assert row["latent_shape"] == [4, 8, 8] and row["text_shape"] == [77, 32]
        latent = from_bf16_bytes(row["latent"], row["latent_shape"])
        assert latent.dtype == np.float32 and np.isfinite(latent).all()
        # The latent is the VAE posterior mean of the stored R×R image, times scaling_factor, to bf16 precision.
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mean[0].numpy() * vae.config.scaling_factor
        np.testing.assert_allclose(latent, expected, rtol=2**-7, atol=1e-3)
        tokens = tokenizer([row["caption"]], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            text = text_model(tokens.input_ids)[0][0].numpy()
        np.testing.assert_allclose(from_bf16_bytes(row["text_encoding"], row["text_shape"]), text, rtol=2**-7, atol=1e-3)
    by_id = {r["id"]: r for r in table}
    assert by_id[data.NO_CAPTION_ID]["caption"] == "" and by_id[data.NO_CAPTION_ID]["text_encoding"] == uncond
    assert by_id["row-3"]["caption"] == "shapes 3"  # no source caption: BLIP's
    assert by_id["row-1"]["caption"] == "a picture of shapes number 1"  # the source's own caption wins
    assert {r["split"] for r in table} == {"train", "heldout"}


def test_sigkilled_encode_resumes_to_the_uninterrupted_result(encoded, assets, conditioning, tmp_path):
    """SIGKILL the real CLI after its first commit, add a stray half write, rerun: committed shards are kept
    as they are, and the result equals the uninterrupted run's, row for row, with no duplicate."""
    out = tmp_path / "encode"
    argv = [sys.executable, "-m", "components.encode", "--config-json", data.config(assets).to_json(),
            "--input", f"conditioning={conditioning.uri}", "--output", str(out)]
    kill_after_commits(argv, None, [out], cwd=REPO)
    before = commit_markers(out)
    assert 1 <= len(before) < len(conditioning.shards) and not (out / "manifest.json").exists()
    (out / "data" / f".tmp-1234-{conditioning.shards[-1]['name']}.parquet").write_bytes(b"half a write")

    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {k: v for k, v in commit_markers(out).items() if k in before} == before, "finished shards were redone"
    assert not [p for p in out.rglob(".tmp-*")]
    resumed = Manifest.load(str(out))
    again, uninterrupted = rows(resumed), rows(encoded)
    assert again == uninterrupted
    assert len({r["id"] for r in again}) == len(again)
    assert (resumed.rows_out, resumed.rows_rejected, resumed.notes) == (encoded.rows_out, encoded.rows_rejected, encoded.notes)


def test_resolution_not_divisible_by_8_fails_before_any_work(assets, conditioning, tmp_path):
    with pytest.raises(ConfigError, match="encode.resolution"):
        stage.run(data.config(assets, resolution=60), {"conditioning": conditioning}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_conditioning_type_fails_before_any_work(assets, conditioning, tmp_path):
    with pytest.raises(ContractError, match="conditioning_type is 'pose'.*holds 'canny'"):
        stage.run(data.config(assets, conditioning_type="pose"), {"conditioning": conditioning}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _tiny_t5(folder: pathlib.Path, d_model: int, tokenizer_from: pathlib.Path) -> str:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, subfolder="tokenizer")
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_t5_text_encoder(assets, conditioning, tmp_path):
    """base_model.text_encoder='t5': T5EncoderModel with its attention mask; its width must fit the UNet."""
    from transformers import AutoTokenizer, T5EncoderModel

    base = assets / "models" / "tiny-sd"
    t5 = _tiny_t5(tmp_path / "t5", 32, base)
    cfg = data.config(assets)
    cfg.base_model.text_encoder, cfg.base_model.t5_model = "t5", t5
    out = stage.run(cfg, {"conditioning": conditioning}, str(tmp_path / "encode"))
    row = rows(out)[0]
    tokenizer, model = AutoTokenizer.from_pretrained(t5), T5EncoderModel.from_pretrained(t5, use_safetensors=True)
    tokens = tokenizer([row["caption"]], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(tokens.input_ids, attention_mask=tokens.attention_mask)[0][0].numpy()
    assert row["text_shape"] == [77, 32]
    np.testing.assert_allclose(from_bf16_bytes(row["text_encoding"], row["text_shape"]), expected, rtol=2**-7, atol=1e-3)

    cfg.base_model.t5_model = _tiny_t5(tmp_path / "t5-wide", 48, base)
    with pytest.raises(ConfigError, match="cross-attends to 32"):
        stage.run(cfg, {"conditioning": conditioning}, str(tmp_path / "encode-wide"))
    assert not (tmp_path / "encode-wide" / "data").exists()


def test_a_rerun_that_finds_every_shard_done_loads_no_model(encoded, assets, conditioning, monkeypatch):
    """A finished encode on rerun costs its manifest check, not loading a VAE and a text encoder."""
    from components.encode import latents, text

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although every shard was done")

    monkeypatch.setattr(latents, "LatentEncoder", no_model)
    monkeypatch.setattr(text, "TextEncoder", no_model)
    again = stage.run(data.config(assets), {"conditioning": conditioning}, encoded.uri)
    assert (again.shards, again.rows_out, again.notes) == (encoded.shards, encoded.rows_out, encoded.notes)
