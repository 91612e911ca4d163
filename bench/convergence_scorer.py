"""bench/convergence.py's held-out scorer, run in evaluate's environment (vision) as a long-lived process.

Reads one .npz path of ControlNet weights (PyTorch names) per line on stdin and answers one JSON line: the mean edge
F1, circle IoU and centre error of evaluate's sampler on the embedded-fill preset's held-out controls.

    .venvs/vision/bin/python bench/convergence_scorer.py RUN   (RUN: an embedded-fill run folder with conditioning/)
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from convergence import fill_config, mean_scores, score  # noqa: E402  (also puts the repo on sys.path)


class HeldoutScorer:
    """A ControlNet's weights (PyTorch names) -> mean edge F1, circle IoU and centre error on the preset's held-out
    controls, through evaluate's own sampler and settings (prompts from encode's text encoder, seeds per sample)."""

    def __init__(self, config, run: pathlib.Path):
        import torch

        from cnpipe.dataset import conditioning_dataset, load_output
        from components.controlnet_train.export import build_pytorch_controlnet
        from components.encode.text import TextEncoder
        from components.evaluate.generate import load_pipeline
        from components.evaluate.samples import select

        self.torch, self.config = torch, config
        enc, ev = config.encode, config.evaluate
        conditioning = conditioning_dataset(load_output(str(run / "conditioning")), enc.conditioning_type)
        selection = select(conditioning, ev.num_samples, enc)
        if selection.heldout_fallback or not selection.samples:
            raise RuntimeError(f"{run}: no held-out rows to score on")
        self.samples = selection.samples
        self.text_encoder = TextEncoder(config.base_model, enc.max_text_length, "cpu")
        with tempfile.TemporaryDirectory(prefix="convergence-controlnet-") as folder:
            build_pytorch_controlnet(config.base_model.path, config.train.conditioning_embedding_out_channels).save_pretrained(folder)
            self.pipeline = load_pipeline(config.base_model, folder, "cpu")
        self.pipeline.set_progress_bar_config(disable=True)

    def __call__(self, weights: dict) -> dict:
        from components.evaluate.generate import generate

        torch, config = self.torch, self.config
        started = time.perf_counter()
        self.pipeline.controlnet.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}, strict=True)
        with torch.no_grad():
            images = generate(self.pipeline, self.text_encoder, self.samples, config.evaluate, config.encode.resolution,
                              config.evaluate.batch_size)
        low, high = config.conditioning.canny_low, config.conditioning.canny_high
        result = mean_scores([score(s.control, image, low, high) for s, image in zip(self.samples, images)])
        return {**result, "sampling_s": round(time.perf_counter() - started, 2)}


def serve(run: pathlib.Path) -> None:
    answers, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints must not mix into the answers
    scorer = HeldoutScorer(fill_config(), run)
    for line in sys.stdin:
        with np.load(line.strip()) as weights:
            result = scorer({k: weights[k] for k in weights.files})
        answers.write(json.dumps(result) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve(pathlib.Path(sys.argv[1]))
