"""fake_quantize agrees bit for bit with torch.fake_quantize_per_{tensor,channel}_affine.

torch's kernels compute ``nearbyint(x * (1 / scale))``; lowbit, like ONNX and ONNX
Runtime, computes ``rint(x / scale)``.  The two differ only where ``x / scale`` lies
within a float32 ulp of a .5 tie.  Every comparison below is therefore exact except on
the explicitly computed *tie-ambiguous* set, which must be tiny, and on which lowbit
must equal the division-based result.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.numerics import QuantSpec, fake_quantize, quantize

F32 = torch.float32
BITS = range(2, 9)
KINDS = ["sym", "sym-narrow", "int-affine", "uint-affine"]
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4, 5), (64, 33), (5, 1, 6), (0, 4)]


def make_spec(bits: int, kind: str, **layout) -> QuantSpec:
    return {
        "sym": QuantSpec(bits=bits, **layout),
        "sym-narrow": QuantSpec(bits=bits, narrow_range=True, **layout),
        "int-affine": QuantSpec(bits=bits, symmetric=False, **layout),
        "uint-affine": QuantSpec(bits=bits, signed=False, symmetric=False, **layout),
    }[kind]


def random_params(spec: QuantSpec, shape: tuple[int, ...], gen: torch.Generator):
    """Log-uniform scales in [1e-3, 10] and (for affine specs) any zero-point on the grid."""
    scale = torch.exp(torch.empty(shape).uniform_(-6.9, 2.3, generator=gen)).to(F32)
    if spec.symmetric:
        zp = torch.zeros(shape, dtype=torch.int32)
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, shape, generator=gen, dtype=torch.int32)
    return scale, zp


def random_input(shape, scale_b, zp_b, spec, gen):
    """Values spread over the grid and up to 30% beyond both ends (so saturation occurs)."""
    span = spec.qmax - spec.qmin
    codes = torch.empty(shape).uniform_(spec.qmin - 0.3 * span, spec.qmax + 0.3 * span, generator=gen)
    return ((codes - zp_b) * scale_b).to(F32)


def div_reference(x, s, z, qmin, qmax):
    """The ONNX definition, spelled out in float32: (saturate(rint(x / s) + z) - z) * s."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def tie_ambiguous(x, s):
    """Elements where dividing by s and multiplying by float32(1 / s) round differently."""
    return torch.round(x / s) != torch.round(x * torch.reciprocal(s))


def assert_agrees_with_torch(ours, theirs, x, s_b, z_b, spec, max_fraction=1e-5):
    amb = tie_ambiguous(x, s_b)
    n = max(1, x.numel())
    assert amb.sum().item() / n < max_fraction, f"{amb.sum().item()} tie-ambiguous elements out of {n}"
    assert torch.equal(ours[~amb], theirs[~amb])
    assert torch.equal(ours[amb], div_reference(x, s_b, z_b, spec.qmin, spec.qmax)[amb])
    return amb


# -- per tensor ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_per_tensor_matches_torch(bits, kind):
    spec = make_spec(bits, kind)
    gen = torch.Generator().manual_seed(1000 * bits + KINDS.index(kind))
    for shape in SHAPES:
        for _ in range(3):
            scale, zp = random_params(spec, (), gen)
            x = random_input(shape, scale, zp, spec, gen)
            ours = fake_quantize(x, scale, zp, spec)
            theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.qmin, spec.qmax)
            assert ours.dtype == F32 and ours.shape == x.shape
            assert_agrees_with_torch(ours, theirs, x, scale, zp, spec)
            # The (float, int) overload of torch's op gives the same values.
            theirs_py = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), spec.qmin, spec.qmax)
            assert torch.equal(theirs_py, theirs)


def test_per_tensor_large_sample_tie_fraction_is_tiny():
    # 4M elements over many scales: the only disagreement is the tie-ambiguous set.
    spec = make_spec(8, "uint-affine")
    gen = torch.Generator().manual_seed(7)
    total = ambiguous = 0
    for _ in range(16):
        scale, zp = random_params(spec, (), gen)
        x = random_input((512, 512), scale, zp, spec, gen)
        ours = fake_quantize(x, scale, zp, spec)
        theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.qmin, spec.qmax)
        amb = assert_agrees_with_torch(ours, theirs, x, scale, zp, spec)
        total += x.numel()
        ambiguous += int(amb.sum())
    assert ambiguous / total < 1e-5


# -- per channel -------------------------------------------------------------------------

CHANNEL_CASES = [
    ((8,), 0),
    ((6, 5), 0),
    ((6, 5), 1),
    ((6, 5), -1),
    ((4, 3, 7), 1),
    ((2, 3, 4, 5), 3),
    ((16, 3, 3, 3), 0),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_per_channel_matches_torch(bits, kind):
    gen = torch.Generator().manual_seed(2000 * bits + KINDS.index(kind))
    for shape, axis in CHANNEL_CASES:
        spec = make_spec(bits, kind, granularity="channel", axis=axis)
        ax = axis % len(shape)
        scale, zp = random_params(spec, (shape[ax],), gen)
        bshape = [1] * len(shape)
        bshape[ax] = -1
        s_b, z_b = scale.reshape(bshape), zp.reshape(bshape)
        x = random_input(shape, s_b, z_b, spec, gen)
        ours = fake_quantize(x, scale, zp, spec)
        theirs = torch.fake_quantize_per_channel_affine(x, scale, zp, ax, spec.qmin, spec.qmax)
        assert_agrees_with_torch(ours, theirs, x, s_b, z_b, spec)


# -- group (ONNX blocked): torch has no such op; emulate with per-channel on a reshaped view --

GROUP_CASES = [((4, 12), 1, 3), ((4, 12), 1, 12), ((6, 4), 0, 2), ((2, 8, 3), 1, 4), ((2, 3, 8), -1, 1)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_group_matches_torch_per_channel_on_blocks(bits, kind):
    gen = torch.Generator().manual_seed(3000 * bits + KINDS.index(kind))
    for shape, axis, gs in GROUP_CASES:
        spec = make_spec(bits, kind, granularity="group", axis=axis, group_size=gs)
        ax = axis % len(shape)
        pshape = shape[:ax] + (shape[ax] // gs,) + shape[ax + 1 :]
        scale, zp = random_params(spec, pshape, gen)
        s_el = scale.repeat_interleave(gs, dim=ax)  # one scale per element
        z_el = zp.repeat_interleave(gs, dim=ax)
        x = random_input(shape, s_el, z_el, spec, gen)
        ours = fake_quantize(x, scale, zp, spec)
        # Blocks: put the group axis last, then every block is one "channel" of torch's op.
        blocks = x.movedim(ax, -1).reshape(-1, gs)
        s_rows = scale.movedim(ax, -1).reshape(-1)
        z_rows = zp.movedim(ax, -1).reshape(-1)
        theirs = torch.fake_quantize_per_channel_affine(blocks, s_rows, z_rows, 0, spec.qmin, spec.qmax)
        theirs = theirs.reshape(x.movedim(ax, -1).shape).movedim(-1, ax)
        assert_agrees_with_torch(ours, theirs, x, s_el, z_el, spec)


# -- rounding ties -------------------------------------------------------------------------


@pytest.mark.parametrize("bits, kind", [(8, "sym"), (8, "uint-affine"), (4, "int-affine"), (3, "sym-narrow")])
@pytest.mark.parametrize("log2_scale", [-7, -1, 0, 3])
def test_exact_ties_round_half_to_even_like_torch(bits, kind, log2_scale):
    spec = make_spec(bits, kind)
    s = torch.tensor(2.0**log2_scale)  # a power of two: x / s and x * (1/s) are both exact
    z = torch.tensor(0 if spec.symmetric else (spec.qmin + spec.qmax) // 2, dtype=torch.int32)
    k = torch.arange(spec.qmin - 3, spec.qmax + 3, dtype=F32) - z
    x = (k + 0.5) * s  # exactly on the .5 tie between k and k + 1
    assert torch.equal(x / s, k + 0.5)
    even = torch.where(k % 2 == 0, k, k + 1)  # round half to even
    expected_q = torch.clamp(even + z, spec.qmin, spec.qmax)
    q = quantize(x, s, z, spec)
    assert torch.equal(q.to(F32), expected_q)
    ours = fake_quantize(x, s, z, spec)
    assert torch.equal(ours, (expected_q - z) * s)
    theirs = torch.fake_quantize_per_tensor_affine(x, s, z, spec.qmin, spec.qmax)
    assert torch.equal(ours, theirs)
    # and never half away from zero: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0, -2.5 -> -2
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]), torch.tensor(1.0), None, QuantSpec())
    assert q.tolist() == [0, 2, 2, 0, -2, -2]


def near_ties(s: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """float32 values within a few ulp of (k + 0.5) * s."""
    centre = ((ks.double() + 0.5) * s.double()).to(F32)
    out = [centre]
    up, down = centre, centre
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, float("-inf")))
        out += [up, down]
    return torch.cat(out)


@pytest.mark.parametrize("scale", [0.1, 0.0123, 3.7, 1 / 3, 0.007843137718737125])
def test_near_ties_follow_division_not_reciprocal(scale):
    spec = make_spec(8, "sym")
    s = torch.tensor(scale, dtype=F32)
    z = torch.tensor(0, dtype=torch.int32)
    x = near_ties(s, torch.arange(-128, 127, dtype=F32))
    amb = tie_ambiguous(x, s)
    assert amb.any(), "the near-tie inputs must exercise the division / reciprocal difference"
    ours = fake_quantize(x, s, z, spec)
    theirs = torch.fake_quantize_per_tensor_affine(x, s, z, spec.qmin, spec.qmax)
    # lowbit: the ONNX definition (divide) everywhere, ties included.
    assert torch.equal(ours, div_reference(x, s, z, spec.qmin, spec.qmax))
    assert torch.equal(quantize(x, s, z, spec).to(F32), torch.clamp(torch.round(x / s), -128, 127))
    # torch: multiply by the reciprocal; the two agree off the ambiguous set.
    recip = (torch.clamp(torch.round(x * torch.reciprocal(s)), -128, 127)) * s
    assert torch.equal(theirs, recip)
    assert torch.equal(ours[~amb], theirs[~amb])
    assert not torch.equal(ours[amb], theirs[amb])


# -- straight-through gradient ----------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_ste_gradient_matches_torch_per_tensor(bits, kind):
    spec = make_spec(bits, kind)
    gen = torch.Generator().manual_seed(4000 * bits + KINDS.index(kind))
    scale, zp = random_params(spec, (), gen)
    x = random_input((50, 40), scale, zp, spec, gen)
    upstream = torch.randn(50, 40, generator=gen)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    fake_quantize(xa, scale, zp, spec).backward(upstream)
    torch.fake_quantize_per_tensor_affine(xb, scale, zp, spec.qmin, spec.qmax).backward(upstream)
    amb = tie_ambiguous(x, scale)
    assert torch.equal(xa.grad[~amb], xb.grad[~amb])
    assert (xa.grad == 0).any() and (xa.grad != 0).any()  # both saturated and passed elements


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_ste_gradient_matches_torch_per_channel(bits, kind):
    spec = make_spec(bits, kind, granularity="channel", axis=1)
    gen = torch.Generator().manual_seed(5000 * bits + KINDS.index(kind))
    scale, zp = random_params(spec, (6,), gen)
    s_b, z_b = scale.reshape(1, -1, 1), zp.reshape(1, -1, 1)
    x = random_input((4, 6, 9), s_b, z_b, spec, gen)
    upstream = torch.randn(4, 6, 9, generator=gen)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    fake_quantize(xa, scale, zp, spec).backward(upstream)
    torch.fake_quantize_per_channel_affine(xb, scale, zp, 1, spec.qmin, spec.qmax).backward(upstream)
    amb = tie_ambiguous(x, s_b)
    assert torch.equal(xa.grad[~amb], xb.grad[~amb])
