"""cnpipe.tensors: numpy-only bfloat16 bytes must equal torch's bfloat16 cast, bit for bit."""
import numpy as np
import pytest
import torch

from cnpipe.tensors import from_bf16_bytes, to_bf16_bytes


def torch_bf16_bytes(array: np.ndarray) -> bytes:
    bf16 = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16)
    return bf16.view(torch.int16).numpy().astype("<i2").tobytes()


def test_matches_torch_on_random_and_special_values():
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    values = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 4096).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, 1e-40, -1e-42], np.float32),
        rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every bit pattern class
    ])
    finite = ~np.isnan(values)
    assert to_bf16_bytes(values[finite]) == torch_bf16_bytes(values[finite])
    back = from_bf16_bytes(to_bf16_bytes(values), values.shape)
    assert np.array_equal(np.isnan(back), np.isnan(values))  # NaN stays NaN, nothing else becomes NaN


def test_rounds_ties_to_even():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # spacing of bfloat16 just above 1
    halfway_down = one + ulp / 2  # between 1 (even) and 1+ulp (odd): to 1
    halfway_up = one + ulp + ulp / 2  # between 1+ulp (odd) and 1+2ulp (even): to 1+2ulp
    above_half = one + ulp / 2 + np.float32(2.0**-20)
    got = from_bf16_bytes(to_bf16_bytes(np.array([halfway_down, halfway_up, above_half], np.float32)), [3])
    assert got.tolist() == [1.0, float(one + 2 * ulp), float(one + ulp)]


def test_round_trip_is_exact_for_bfloat16_values_and_keeps_shape_and_order():
    exact = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float().numpy()
    data = to_bf16_bytes(exact)
    assert len(data) == 2 * exact.size
    back = from_bf16_bytes(data, [2, 3, 4])
    assert back.dtype == np.float32 and back.shape == (2, 3, 4)
    assert np.array_equal(back, exact)
    assert np.array_equal(from_bf16_bytes(to_bf16_bytes(exact.transpose(2, 0, 1)), [4, 2, 3]), exact.transpose(2, 0, 1))


def test_overflow_goes_to_infinity():
    big = np.array([3.4e38, -3.4e38], np.float32)  # past bfloat16's largest finite value after rounding
    assert from_bf16_bytes(to_bf16_bytes(big), [2]).tolist() == [np.inf, -np.inf]


def test_wrong_length_is_refused():
    with pytest.raises(ValueError, match="shape \\[4, 8, 8\\]"):
        from_bf16_bytes(b"\x00" * 10, [4, 8, 8])
