"""Training-dynamics parity: our trainer's step against diffusers' PyTorch ControlNet training step.

From the same initial ControlNet, batches, noise, timesteps and dropped captions, our jitted step (built by
stage.build_training from a TrainConfig, as the stage trains: AdamW, warm-up and decay, clipping, EMA) and
train_controlnet.py's step (bench/diffusers_reference.py) train STEPS steps in fp32 on CPU. The same PyTorch step in
float64 measures what float rounding alone does to the loss curve and to the weights (the "spread": its largest
value over the run); ours must stay within TOLERANCE_FACTOR x that spread of PyTorch's fp32 run at every step,
and in the final raw and EMA weights and the EMA after EARLY steps. (A per-step tolerance would be noise-driven:
at a step where fp32 happens to round within an ulp of float64, two fp32 implementations still differ by a few
ulps.) Measured: ours stays within ~3x (loss) and ~1.5x (weights) of the spread; diffusers' Flax models without
numerics.pytorch_numerics, a wrong v target, timestep, noise schedule, warm-up, clipping, caption dropout or EMA
warm-up each fail it.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from base_model import CONDITIONING_CHANNELS, RESOLUTION, TEXT_SHAPE
from bench.diffusers_reference import SCHEDULER_NAMES, ReferenceTrainer
from runs import make_config

STEPS = 100
EARLY = 10  # the EMA is also compared after this many steps, where its warm-up weighs most
TOLERANCE_FACTOR = 10.0
# A learning rate at which 100 steps move the weights some 500x more than rounding does, yet low enough that the
# rounding spread does not grow chaotically (at 1e-3 it reaches 1e-2 in the weights by step 100, and the check
# would mean little); clipping engages on part of the steps (checked); EMA decay 0.9 is reached by the warm-up
# at step 81, so both of its regimes run.
PARITY = dict(global_batch_size=4, max_steps=STEPS, learning_rate=1e-4, warmup_steps=10, max_grad_norm=0.35, ema_decay=0.9,
              weight_decay=1e-2, compute_dtype="auto", shard_state="replicated")
CASES = {
    "epsilon": dict(lr_schedule="cosine", caption_dropout=0.3),
    "v_prediction": dict(lr_schedule="linear", caption_dropout=0.0),
}


def base_with(base: str, root, unet: dict | None = None, scheduler: dict | None = None) -> str:
    """A copy of the test base with some UNet or scheduler config values changed."""
    folder = root / "base"
    shutil.copytree(base, folder)
    for sub, name, changes in (("unet", "config.json", unet), ("scheduler", "scheduler_config.json", scheduler)):
        path = folder / sub / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **(changes or {})}))
    return str(folder)


def batches(count: int, rows: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Random encode-stage rows (latents, text encodings, controls in [0, 1]) and an empty-prompt encoding."""
    rng = np.random.default_rng(seed)
    side = RESOLUTION // 8
    out = [{"latents": rng.standard_normal((rows, 4, side, side), dtype=np.float32),
            "text": rng.standard_normal((rows, *TEXT_SHAPE), dtype=np.float32),
            "control": rng.random((rows, 3, RESOLUTION, RESOLUTION), dtype=np.float32)} for _ in range(count)]
    return out, rng.standard_normal(TEXT_SHAPE, dtype=np.float32)


def host_copy(tree):
    import jax

    from components.controlnet_train import distributed

    return jax.tree.map(lambda x: np.array(x, copy=True), distributed.to_host(tree))


def train_ours(config, data: list[dict], uncond: np.ndarray) -> dict:
    """Our stage's own step (stage.build_training) on one CPU device, and the draws it made at every step."""
    import jax
    import jax.numpy as jnp

    from components.controlnet_train import distributed, model, stage
    from components.controlnet_train.step import random_draws, step_key

    t = config.train
    dtype = stage.compute_dtype(t.compute_dtype)
    assert dtype == jnp.float32  # "auto" computes in fp32 on CPU
    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(config.base_model.path)
    base = model.load_base(folder, unet_config, scheduler_config, vae_config, dtype)
    controlnet = model.make_controlnet(model.controlnet_config(unet_config, t.conditioning_embedding_out_channels), dtype)
    mesh = distributed.data_mesh(jax.devices()[:1])
    state, unet_params, step_fn = stage.build_training(t, base, controlnet, scheduler_config, uncond, mesh, dtype)
    init, rng = host_copy(state.params), host_copy(state.rng)
    metrics = []
    for i, batch in enumerate(data):
        state, m = step_fn(state, unet_params, distributed.global_batch(mesh, batch, t.global_batch_size))
        metrics.append(m)
        if i + 1 == EARLY:
            ema_early = host_copy(state.ema_params)
    metrics = distributed.to_host(metrics)
    draw = jax.jit(random_draws, static_argnums=(1, 2, 3))
    timesteps = scheduler_config.get("num_train_timesteps", 1000)
    draws = [jax.tree.map(np.asarray, draw(step_key(rng, i), data[i]["latents"].shape, timesteps, t.caption_dropout))
             for i in range(len(data))]
    return {"init": init, "params": host_copy(state.params), "ema": host_copy(state.ema_params), "ema_early": ema_early, "draws": draws,
            "loss": np.array([float(m["loss"]) for m in metrics]), "grad_norm": np.array([float(m["grad_norm"]) for m in metrics])}


def train_reference(config, init_torch: dict, data: list[dict], draws: list, uncond: np.ndarray, dtype) -> dict:
    """One thread: on tensors this small torch's intra-op threads only wait for each other (20x slower on 2 busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = ReferenceTrainer(config.base_model.path, CONDITIONING_CHANNELS, init_torch, config.train, dtype)
        losses = []
        for i, (batch, draw) in enumerate(zip(data, draws)):
            losses.append(trainer.step(batch, *draw, uncond))
            if i + 1 == EARLY:
                ema_early = trainer.ema_weights()
    finally:
        torch.set_num_threads(threads)
    return {"loss": np.array(losses), "params": trainer.weights(), "ema": trainer.ema_weights(), "ema_early": ema_early}


@pytest.fixture(scope="module", params=sorted(CASES))
def parity_run(request, base, tmp_path_factory):
    """Our run and PyTorch's in fp32 and in float64 of one case, same start and draws."""
    import torch

    from components.controlnet_train.export import build_pytorch_controlnet
    from components.controlnet_train.weights import flax_to_pytorch

    case = request.param
    folder = base_with(base, tmp_path_factory.mktemp(case), scheduler={"prediction_type": case})
    config = make_config(folder, **PARITY, **CASES[case])
    data, uncond = batches(STEPS, config.train.global_batch_size)
    ours = train_ours(config, data, uncond)
    from_unet = build_pytorch_controlnet(folder, CONDITIONING_CHANNELS).state_dict()
    shapes = {k: tuple(v.shape) for k, v in from_unet.items()}
    to_torch = lambda params: flax_to_pytorch(params, shapes, "parity")  # noqa: E731
    init = to_torch(ours["init"])
    ours = {**ours, **{name: to_torch(ours[name]) for name in ("params", "ema", "ema_early")}}
    fp32 = train_reference(config, init, data, ours["draws"], uncond, torch.float32)
    fp64 = train_reference(config, init, data, ours["draws"], uncond, torch.float64)
    return {"case": case, "config": config, "ours": ours, "fp32": fp32, "fp64": fp64, "init": init,
            "from_unet": {k: v.numpy() for k, v in from_unet.items()}}


def _weights_gap(a: dict, b: dict) -> tuple[float, float]:
    """(largest absolute difference, L2 norm of the difference) over every weight."""
    diffs = [np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64) for k in sorted(b)]
    return max(float(np.abs(d).max()) for d in diffs), float(np.sqrt(sum(float(np.sum(d * d)) for d in diffs)))


def test_loss_curves_agree_step_by_step(parity_run):
    ours, fp32, fp64 = parity_run["ours"], parity_run["fp32"], parity_run["fp64"]
    assert len(ours["loss"]) == STEPS and np.all(np.isfinite(ours["loss"]))
    spread = np.abs(fp32["loss"] - fp64["loss"])  # what rounding alone does, step by step
    tolerance = TOLERANCE_FACTOR * spread.max()
    gap = np.abs(ours["loss"] - fp32["loss"])
    print(f"\n{parity_run['case']}: loss spread fp32 vs fp64 max {spread.max():.2e} (median {np.median(spread):.2e}); "
          f"ours vs PyTorch fp32 max {gap.max():.2e} (step {int(gap.argmax()) + 1}, {gap.max() / spread.max():.2f}x the spread), "
          f"median {np.median(gap):.2e}")
    assert np.all(gap <= tolerance), (
        f"loss curves differ beyond {TOLERANCE_FACTOR}x the fp32 rounding spread ({tolerance:.2e}) first at step "
        f"{int(np.argmax(gap > tolerance)) + 1}; ours {ours['loss'][:5]} vs PyTorch {fp32['loss'][:5]}")
    # clipping is both on and off in this run
    norms = ours["grad_norm"]
    assert (norms > PARITY["max_grad_norm"]).sum() >= 10 and (norms < PARITY["max_grad_norm"]).sum() >= 10, norms


def _weights(run: dict, which: str) -> dict:
    """params, ema, ema_early (after EARLY steps), or ema_lag: how far the final EMA trails the raw weights, which
    the EMA decay alone sets (the weights' own spread would hide a small change of the decay; the lag's does not)."""
    if which != "ema_lag":
        return run[which]
    return {k: np.asarray(run["ema"][k], np.float64) - np.asarray(run["params"][k], np.float64) for k in run["ema"]}


@pytest.mark.parametrize("which", ["params", "ema", "ema_early", "ema_lag"])
def test_final_weights_agree(parity_run, which):
    ours, fp32, fp64 = (_weights(parity_run[side], which) for side in ("ours", "fp32", "fp64"))
    spread_max, spread_l2 = _weights_gap(fp32, fp64)
    gap_max, gap_l2 = _weights_gap(ours, fp32)
    zero = {k: np.zeros_like(v) for k, v in fp64.items()}
    signal_max, _ = _weights_gap(fp64, zero if which == "ema_lag" else parity_run["init"])
    print(f"\n{parity_run['case']} {which}: {'size' if which == 'ema_lag' else 'moved'} {signal_max:.2e}; spread max {spread_max:.2e} "
          f"L2 {spread_l2:.2e}; ours vs fp32 max {gap_max:.2e} ({gap_max / spread_max:.2f}x) L2 {gap_l2:.2e} ({gap_l2 / spread_l2:.2f}x)")
    assert signal_max > 2 * TOLERANCE_FACTOR * spread_max  # what training did is well beyond the tolerance
    assert gap_max <= TOLERANCE_FACTOR * spread_max and gap_l2 <= TOLERANCE_FACTOR * spread_l2


def test_initial_controlnet_is_diffusers_from_unet(parity_run):
    """Our start = ControlNetModel.from_unet's: the UNet's encoder copied, zero convolutions zero (only the
    conditioning embedder's hidden convolutions are random, on both sides)."""
    init, from_unet = parity_run["init"], parity_run["from_unet"]
    assert set(init) == set(from_unet)
    random = [k for k in init if k.startswith("controlnet_cond_embedding.") and not k.startswith("controlnet_cond_embedding.conv_out")]
    assert random
    for key in sorted(set(init) - set(random)):
        np.testing.assert_array_equal(init[key], from_unet[key], err_msg=key)
    zero = [k for k in init if k.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))]
    assert zero and all(not init[k].any() for k in zero)


@pytest.mark.parametrize("kind", sorted(SCHEDULER_NAMES))
def test_lr_schedule_is_diffusers_get_scheduler(kind):
    """Every step's learning rate, warm-up included, as get_scheduler's LambdaLR sets it before that step
    (our "constant" keeps the warm-up: diffusers' "constant_with_warmup")."""
    import torch
    from diffusers.optimization import get_scheduler

    from components.controlnet_train.step import lr_schedule

    lr, warmup, steps = 1e-4, 10, 100
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(SCHEDULER_NAMES[kind], optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    theirs = []
    for _ in range(steps):
        theirs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    ours = np.array([float(lr_schedule(lr, warmup, steps, kind)(i)) for i in range(steps)])
    eps = float(np.finfo(np.float32).eps)  # optax computes the schedule in float32
    np.testing.assert_allclose(ours, theirs, rtol=4 * eps, atol=4 * eps * lr)


@pytest.mark.parametrize("decay", [0.9, 0.9999])
def test_ema_decay_is_diffusers_ema_model(decay):
    """Update k uses EMAModel.get_decay(k) (default settings: no decay on the first update, then (1+s)/(10+s) with
    s = k - 1, capped); the trainer's warm-up used to run one update ahead of it."""
    import torch
    from diffusers.training_utils import EMAModel

    from components.controlnet_train.step import ema_decay_at

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
    updates = np.arange(1, 301)
    theirs = np.array([ema.get_decay(k) for k in updates])
    ours = np.array([float(ema_decay_at(k - 1, decay)) for k in updates])
    np.testing.assert_allclose(ours, theirs, rtol=4 * float(np.finfo(np.float32).eps), atol=0)
    assert ours[0] == 0.0


def test_draws_are_train_controlnet_distributions():
    """The draws both sides share must be what train_controlnet.py draws: randn noise, timesteps uniform on
    [0, num_train_timesteps), each caption dropped with probability proportion_empty_prompts (bounds: 5 sigma)."""
    import jax

    from components.controlnet_train.step import random_draws

    rows, steps, p = 20_000, 1000, 0.3
    noise, timesteps, drop = (np.asarray(x) for x in random_draws(jax.random.PRNGKey(1), (rows, 4, 4, 4), steps, p))
    assert noise.dtype == np.float32 and abs(noise.mean()) < 5 / np.sqrt(noise.size) and abs(noise.std() - 1) < 5 / np.sqrt(noise.size / 2)
    assert timesteps.min() == 0 and timesteps.max() == steps - 1
    counts = np.bincount(timesteps // 100, minlength=10)
    assert np.all(np.abs(counts - rows / 10) < 5 * np.sqrt(rows / 10)), counts
    assert abs(drop.mean() - p) < 5 * np.sqrt(p * (1 - p) / rows)
    assert random_draws(jax.random.PRNGKey(1), (4, 4, 4, 4), steps, 0.0)[2] is None


@pytest.mark.parametrize("setting", [{"norm_eps": 1e-6}, {"center_input_sample": True}, {"resnet_out_scale_factor": 2.0}])
def test_base_that_flax_would_train_differently_is_refused(base, tmp_path, setting):
    """A base whose Flax model would differ from its PyTorch export is refused where the trainer loads it."""
    from components.controlnet_train import model
    from components.controlnet_train.weights import ModelError

    folder = base_with(base, tmp_path, unet=setting)
    (key, value), = setting.items()
    with pytest.raises(ModelError, match=f"{key}={value!r}.*PyTorch export"):
        model.read_base_configs(folder)
    unet_config = {**model.read_config(base, "unet"), **setting}
    with pytest.raises(ModelError, match=key):
        model.load_base(folder, unet_config, {}, {"block_out_channels": [1]}, np.float32)


def test_upcast_attention_is_accepted_because_pytorch_ignores_it(base, tmp_path):
    """upcast_attention (SD 2.x) is not refused: PyTorch's default attention processor, which the export and
    train_controlnet.py run with, ignores it even in bf16, as the Flax attention does. Fails if diffusers changes that."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from base_model import UNET
    from components.controlnet_train import model

    model.read_base_configs(base_with(base, tmp_path, unet={"upcast_attention": True}))
    torch.manual_seed(0)
    plain = UNet2DConditionModel(**UNET).eval()
    upcast = UNet2DConditionModel(**UNET, upcast_attention=True).eval()
    upcast.load_state_dict(plain.state_dict())
    assert all(isinstance(p, AttnProcessor2_0) for p in upcast.attn_processors.values())
    rng = np.random.default_rng(0)
    inputs = (torch.from_numpy(rng.standard_normal((2, 4, 4, 4), dtype=np.float32)).bfloat16(), torch.tensor([10, 900]),
              torch.from_numpy(rng.standard_normal((2, *TEXT_SHAPE), dtype=np.float32)).bfloat16())
    with torch.no_grad():
        a, b = (m.bfloat16()(*inputs).sample for m in (plain, upcast))
    assert torch.equal(a, b)
