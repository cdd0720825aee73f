"""Forward operators: batching, seeded measurement, the 180-degree twin, gradients (gradcheck in float64)."""
import copy

import pytest
import torch

from cores.fourier import centred_fft2, dft2_matmul
from cores.operators import (DenseGaussian, DownSampling, GaussianBlur, Inpainting, LatentOperator, Operator,
                             PhaseRetrieval, build_operator, linear_matrix)

OPERATORS = {
    "phase_retrieval": lambda: PhaseRetrieval(oversample=2.0),
    "inpainting_box": lambda: Inpainting("box", resolution=8, mask_len_range=(3, 4), seed=1),
    "inpainting_random": lambda: Inpainting("random", resolution=8, mask_prob_range=(0.5, 0.51), seed=1),
    "down_sampling": lambda: DownSampling(scale_factor=2),
    "gaussian_blur": lambda: GaussianBlur(kernel_size=5, intensity=1.0),
    "dense_gaussian": lambda: DenseGaussian(num_measurements=20, dim=3 * 8 * 8, seed=1),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_gradcheck_float64(name):
    op = OPERATORS[name]().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 1.6 - 0.8
    assert torch.autograd.gradcheck(op, (x.requires_grad_(True),), eps=1e-6, atol=1e-5)
    y = op(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda v: op.loss(v, y), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", OPERATORS)
def test_batched_equals_per_element_and_gradient_is_per_element(name):
    op = OPERATORS[name]()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    out = op(x)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], op(x[i:i + 1]), rtol=1e-5, atol=1e-6)
    y = op(torch.rand(3, 3, 8, 8) * 2 - 1)
    grad, loss = op.gradient(x, y)
    assert loss.shape == (3,)
    for i in range(3):
        g_i, l_i = op.gradient(x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(grad[i:i + 1], g_i, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss[i:i + 1], l_i, rtol=1e-5, atol=1e-6)


def test_phase_retrieval_geometry_and_twin():
    op = PhaseRetrieval(oversample=2.0)
    assert op(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 384, 384)  # 64 px of padding per side
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(op(x), op(x.flip(-2, -1)), rtol=1e-4, atol=1e-5)
    # orthonormal FFT: Parseval on the padded [0, 1] image
    torch.testing.assert_close(op(x).pow(2).sum((1, 2, 3)), (x * 0.5 + 0.5).pow(2).sum((1, 2, 3)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 12, 12), (1, 1, 7, 10)])
def test_matmul_dft_equals_torch_fft(shape):
    """The XLA path (DFT matrices) and torch.fft give the same centred transform and the same gradient."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, *shape, dtype=torch.float64)
    spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    for got, want in zip(dft2_matmul(x), (spec.real, spec.imag)):
        torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad((w[0] * re + w[1] * im).sum(), x)[0] for re, im in (dft2_matmul(x), centred_fft2(x))]
    torch.testing.assert_close(*grads)


def test_bf16_dft_emulation():
    """scripts/dft_precision.py: one bf16 pass is coarser than three, and both stay far below the noise sigma."""
    from scripts.dft_precision import dft_magnitude

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = PhaseRetrieval()(x.double() * 2 - 1)
    padded = torch.nn.functional.pad(x, (8,) * 4)  # PhaseRetrieval's padding of 32 px
    err1, err3 = ((dft_magnitude(padded, p).double() - exact).pow(2).mean().sqrt() for p in (1, 3))
    assert 0 < 100 * err3 < err1 < 0.05 / 10


def test_phase_retrieval_magnitude_has_zero_gradient_at_zero():
    op = PhaseRetrieval(oversample=0.0)
    x = torch.full((1, 1, 4, 4), -1.0, dtype=torch.float64, requires_grad=True)  # all zeros after the [0,1] map
    op(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("oversample, size", [(2.0, 8), (1.0, 7), (0.0, 4), (1.0, 6)])
def test_phase_retrieval_closed_form_gradient_is_autograds(oversample, size):
    """grad || |F pad(x)| - y ||^2 = crop 2 Re F^-1(r U / |U|) / 2 (PhaseRetrieval.gradient: rfft2 against the
    symmetrised measurement) against autograd of the loss, in float64, for even padded sizes (12, 4, 6: the
    centring as signs) and an odd one (7: autograd itself), with a noisy y (not symmetric, as measured) and a
    noise-free one; an all-black image (U = 0 everywhere) has gradient 0 in both."""
    op = PhaseRetrieval(oversample=oversample).double()
    x = torch.rand(3, 2, size, size, dtype=torch.float64) * 2 - 1
    x[2] = -1.0
    clean = op(torch.rand(3, 2, size, size, dtype=torch.float64) * 2 - 1)
    for y in (clean, clean + 0.3 * torch.randn_like(clean)):
        grad, loss = op.gradient(x, y)
        ref_grad, ref_loss = Operator.gradient(op, x, y)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        assert grad[2].abs().max() == 0 and ref_grad[2].abs().max() == 0
        one, skipped = op.gradient(x[1:2], y[1:2], with_loss=False)  # a smaller batch in the padded buffer
        torch.testing.assert_close(one, ref_grad[1:2], rtol=1e-10, atol=1e-12)
        assert skipped is None or size % 2  # only the closed form (even padded sizes) skips the loss


def test_phase_retrieval_half_measurement_follows_the_measurement():
    """The symmetrised half measurement is kept per measurement tensor, and remade for another tensor or after that
    tensor changed in place (the gradient then still equals autograd's); the operator keeps no state (deep copies)."""
    import copy

    from cores.operators import half_measurement

    op = PhaseRetrieval().double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = op(torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1)
    first = half_measurement(y)
    assert half_measurement(y) is first
    other = y.clone()
    assert half_measurement(other) is not first and half_measurement(y) is first
    y.add_(0.2 * torch.randn_like(y))
    assert half_measurement(y) is not first
    torch.testing.assert_close(op.gradient(x, y)[0], Operator.gradient(op, x, y)[0], rtol=1e-10, atol=1e-12)
    copy.deepcopy(op)
    with torch.inference_mode():
        frozen = y.clone()
        torch.testing.assert_close(op.gradient(x, frozen)[0], op.gradient(x, y)[0])
        first = op.gradient(x[:1].clone(), frozen[:1])[0]  # a padding buffer made in inference mode ...
    torch.testing.assert_close(op.gradient(x[:1], y[:1])[0], first)  # ... and one outside it


def test_compiled_spectral_residual_is_the_eager_one():
    """The compiled spectrum kernel (used on CUDA) equals the eager function, here compiled for the CPU, at two
    batch sizes and two scales (dynamic sizes, floats not specialised: one compile per ``with_loss``), zeros of the
    spectrum included."""
    from cores.operators import spectral_residual
    from utils.device import compiled

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.cache_clear()
    for batch, c in ((3, 0.25), (5, 1 / 12)):
        spec = torch.randn(batch, 2, 12, 7, 2)
        spec[0, 0, :2] = 0.0
        args = (spec, torch.rand(batch, 2, 12, 7), torch.rand(7), c)
        back, loss = spectral_residual(*args)
        for with_loss in (True, False):
            got_back, got_loss = compiled(spectral_residual)(*args, with_loss)
            torch.testing.assert_close(got_back, back, rtol=1e-5, atol=1e-6)
            if with_loss:
                torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
            else:
                assert got_loss is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per with_loss
    compiled.cache_clear()


def test_latent_operator_gradient_pulls_the_pixel_gradient_back_through_the_decoder():
    torch.manual_seed(0)
    op = PhaseRetrieval().double()
    decoder = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 1, 2, stride=2), torch.nn.Tanh()).double()
    lat = LatentOperator(op, decoder)
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = op(torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1)
    grad, loss = lat.gradient(z, y)
    ref_grad, ref_loss = Operator.gradient(lat, z, y)  # both score the decoded image in float32 (LatentOperator.loss)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)


def test_measure_is_seeded_per_image():
    op = PhaseRetrieval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    gens = lambda a, b: [torch.Generator().manual_seed(a), torch.Generator().manual_seed(b)]  # noqa: E731
    y1, y2 = op.measure(x, gens(1, 2)), op.measure(x, gens(1, 3))
    torch.testing.assert_close(y1[0], y2[0])
    assert not torch.allclose(y1[1], y2[1])
    torch.testing.assert_close(op.measure(x[:1], gens(1, 2)[:1])[0], y1[0])
    assert (y1 - op(x)).std() == pytest.approx(0.05, rel=0.2)


def test_linear_matrix_reproduces_the_operator():
    op = Inpainting("random", resolution=4, mask_prob_range=(0.5, 0.51), seed=3)
    m = linear_matrix(op, (1, 4, 4))
    x = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close((m.float() @ x.flatten()).view(1, 1, 4, 4), op(x))
    assert op.mask.dtype == torch.float32  # building the matrix left the operator untouched


def test_latent_operator_composes_decode():
    op = DownSampling(scale_factor=2)
    lat = LatentOperator(op, lambda z: z.repeat_interleave(2, -1).repeat_interleave(2, -2))
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(lat(z), op(z.repeat_interleave(2, -1).repeat_interleave(2, -2)))


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown operator"):
        build_operator({"name": "nope"})
    with pytest.raises(ValueError, match="bad arguments"):
        build_operator({"name": "phase_retrieval", "oversampel": 2})
    with pytest.raises(ValueError, match="resolution"):
        Inpainting("box", resolution=8, mask_len_range=(3, 4)).check_input((3, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        DownSampling(scale_factor=4).check_input((3, 10, 10))
    op = copy.deepcopy(build_operator({"name": "inpainting", "mask_type": "random", "resolution": 8}, seed=5))
    op2 = build_operator({"name": "inpainting", "mask_type": "random", "resolution": 8}, seed=5)
    assert torch.equal(op.mask, op2.mask)


def test_phase_retrieval_gradient_runs_its_spectrum_kernel_without_grad(monkeypatch):
    """The closed form runs in one grad mode whatever the caller's (the MCMC calls it with grad enabled, the run's
    warm-up without), so that its compiled kernel on CUDA is traced once, not once per mode."""
    import cores.operators as ops

    modes = []
    plain = ops.spectral_residual
    monkeypatch.setattr(ops, "spectral_residual", lambda *a: (modes.append(torch.is_grad_enabled()), plain(*a))[1])
    op = PhaseRetrieval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    y = op(torch.rand(2, 1, 8, 8) * 2 - 1)
    with torch.enable_grad():
        op.gradient(x, y)
    with torch.no_grad():
        op.gradient(x, y)
    assert modes == [False, False]
