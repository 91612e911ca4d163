"""The training state sharded over the devices (ZeRO-style) trains exactly like the replicated one, holds 1/N of
the bytes per device, and checkpoints move between the layouts and device counts.

All from one process with 8 virtual CPU devices (layouts.py, started with the session): the stage's own
build_training on meshes of 1, 2, 4 and 8 of them, the same batches and seeds; gradient accumulation, clipping,
EMA, caption dropout and LR warm-up on. On one device count the two layouts come out bit-identical on CPU; the
tolerance is a few fp32 ulps (1e-6 of each tensor's scale). Across device counts the batch mean is summed in
another order, and Adam's normalisation amplifies that rounding for weights whose gradient is near zero: those
are compared with the looser CROSS_COUNT tolerance.
"""
from __future__ import annotations

import numpy as np

from runs import LAYOUT_STEPS, RESUME_AT, RESUMES

COUNTS = (1, 2, 4, 8)
TREES = ("params", "ema", "mu", "nu")  # fp32 weights, EMA, both AdamW moments
CROSS_COUNT = 1e-4  # absolute, on weights that move by up to LAYOUT_STEPS x lr = 4e-3


def _close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Equal within fp32 rounding: 1e-6 relative, or 1e-6 of the tensor's largest magnitude."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=what)


def _expected_spec(shape: list[int], count: int) -> list:
    dims = [i for i, n in enumerate(shape) if count > 1 and n >= count and n % count == 0]
    best = max(dims, key=lambda i: shape[i]) if dims else None
    return ["data" if i == best else None for i in range(len(shape))]


def test_sharded_state_is_one_nth_per_device(layout_runs):
    results, _ = layout_runs
    runs = results["runs"]
    full = runs["1-replicated"]["bytes_per_device"]
    for count in COUNTS:
        assert runs[f"{count}-replicated"]["bytes_per_device"] == full
        for leaf in runs[f"{count}-replicated"]["shardings"]:
            assert leaf["spec"] == [None] * len(leaf["shape"]) and leaf["shard"] == leaf["shape"], leaf
        sharded = runs[f"{count}-sharded"]
        split = 0
        for leaf in sharded["shardings"]:
            spec = _expected_spec(leaf["shape"], count)
            assert leaf["spec"] == spec, leaf  # the largest dimension the device count divides, else replicated
            assert leaf["shard"] == [n // count if s else n for n, s in zip(leaf["shape"], spec)], leaf
            split += any(spec)
        if count > 1:
            assert split > 0.9 * len(sharded["shardings"])  # weights, moments and EMA: nearly every leaf divides
        # 1/N of the state per device; what stays whole (step, RNG, Adam's count) is a few bytes
        assert full / count <= sharded["bytes_per_device"] < full / count * 1.01, (count, sharded["bytes_per_device"], full)


def test_sharded_and_replicated_train_alike_on_1_2_4_8_devices(layout_runs):
    results, arrays = layout_runs
    runs = results["runs"]
    reference = runs["1-replicated"]
    assert len(set(np.round(reference["losses"], 4))) == LAYOUT_STEPS  # distinct batches, a real trajectory
    assert runs["1-sharded"]["shardings"] == runs["1-replicated"]["shardings"]  # one device: one layout, trained once
    for count in COUNTS[1:]:
        replicated, sharded = runs[f"{count}-replicated"], runs[f"{count}-sharded"]
        _close(np.array(sharded["losses"]), np.array(replicated["losses"]), f"losses on {count} devices")
        _close(np.array(sharded["grad_norms"]), np.array(replicated["grad_norms"]), f"gradient norms on {count} devices")
        for tree in TREES:
            _close(arrays[f"{count}-sharded/{tree}"], arrays[f"{count}-replicated/{tree}"], f"{tree} on {count} devices")
        # and data parallelism itself: more devices train like one (batch-mean summation order aside)
        np.testing.assert_allclose(replicated["losses"], reference["losses"], rtol=1e-5, err_msg=f"{count} vs 1 device")
        for tree in ("params", "ema"):
            np.testing.assert_allclose(arrays[f"{count}-sharded/{tree}"], arrays[f"1-replicated/{tree}"], rtol=0, atol=CROSS_COUNT,
                                       err_msg=f"{tree}: {count} devices vs 1")
    moved = np.abs(arrays["1-replicated/params"] - arrays["initial/params"]).max()
    assert moved > 10 * CROSS_COUNT  # the weights moved far more than the tolerance: the comparison can fail


def test_checkpoints_resume_across_layouts_and_device_counts(layout_runs):
    results, arrays = layout_runs
    runs, resumes = results["runs"], results["resumes"]
    pairs = [(tuple(a), tuple(b)) for a, b in RESUMES]
    assert {(a[1], b[1]) for a, b in pairs} >= {("sharded", "replicated"), ("replicated", "sharded")}
    assert all(a[0] != b[0] for a, b in pairs)  # every resume changes the device count
    for (save_count, save_layout), (count, layout) in pairs:
        key = f"{save_count}-{save_layout}->{count}-{layout}"
        resumed = resumes[key]
        assert resumed["restored_in_target_shardings"], key  # orbax placed it as the target's state, not as saved
        assert resumed["bytes_per_device"] == runs[f"{count}-{layout}"]["bytes_per_device"], key
        for tree in TREES:  # what was saved is what comes back, bit for bit, whatever the layout
            np.testing.assert_array_equal(arrays[f"{key}/restored/{tree}"], arrays[f"{key}/saved/{tree}"], err_msg=f"{key} {tree}")
        losses = np.array(resumed["losses"])
        _close(losses[:RESUME_AT], np.array(runs[f"{save_count}-{save_layout}"]["losses"][:RESUME_AT]), f"{key} before the save")
        np.testing.assert_allclose(losses, runs[f"{count}-{layout}"]["losses"], rtol=1e-5, err_msg=key)
        for tree in ("params", "ema"):
            np.testing.assert_allclose(arrays[f"{key}/final/{tree}"], arrays[f"{count}-{layout}/{tree}"], rtol=0, atol=CROSS_COUNT,
                                       err_msg=f"{key} {tree}")
