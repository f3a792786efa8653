"""Explicit 16-lane fp32 vectors for Numba kernels.

Numba has no vector type, and LLVM does not keep an unrolled set of scalar
accumulators in vector registers by itself (measured: 5-6 GFLOP/s instead of
~100). This module adds one: :data:`f32x16` is an LLVM ``<16 x float>`` value
that Numba code can hold in local variables, so loop-carried accumulators live
in registers (one zmm each on AVX-512; LLVM splits them into two ymm on AVX2).

The intrinsics are deliberately unchecked (no bounds check, no negative-index
wraparound): the kernels that use them compute every offset from validated
shapes, and the Python wrappers in :mod:`spdy.kernels` validate the inputs.
All arrays passed here must be 1-D and C-contiguous.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


class F32x16Type(types.Type):
    """Numba type of a 16-lane fp32 vector held in a register."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 - Numba's model signature
        super().__init__(dmm, fe_type, _VEC)


def _elem_ptr(context, builder, aryty, ary, idx, idxty):  # noqa: ANN001, ANN202
    arr = context.make_array(aryty)(context, builder, ary)
    off = context.cast(builder, idx, idxty, types.int64)
    return builder.gep(arr.data, [off], inbounds=True)


def _vec_ptr(context, builder, aryty, ary, idx, idxty):  # noqa: ANN001, ANN202
    return builder.bitcast(_elem_ptr(context, builder, aryty, ary, idx, idxty), _VEC.as_pointer())


@intrinsic
def ld(typingctx, arr, idx):  # noqa: ANN001, ANN201
    """``arr[idx]`` for a 1-D array, without bounds check or wraparound."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]))

    return arr.dtype(arr, idx), codegen


@intrinsic
def vbroadcast(typingctx, w):  # noqa: ANN001, ANN201
    """A vector with all 16 lanes equal to the fp32 scalar ``w``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        val = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), val, ir.Constant(_I32, 0))
        zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
        return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined), zeros)

    return f32x16(w), codegen


@intrinsic
def vload(typingctx, arr, idx):  # noqa: ANN001, ANN201
    """The 16 fp32 values ``arr[idx:idx + 16]`` (unaligned load allowed)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.load(_vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), align=4)

    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):  # noqa: ANN001, ANN201
    """Store the vector ``v`` to ``arr[idx:idx + 16]``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        builder.store(args[2], _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def vfma(typingctx, acc, w, x):  # noqa: ANN001, ANN201
    """``acc + w * x`` lane-wise, as one fused multiply-add."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fma.v16f32")
        return builder.call(fn, [args[1], args[2], args[0]])

    return f32x16(f32x16, f32x16, f32x16), codegen


def _transpose_network(builder, rows):  # noqa: ANN001, ANN202
    """Transpose 16 vectors of 16 lanes by swapping off-diagonal blocks of 8, 4, 2, 1."""
    rows = list(rows)
    for b in (8, 4, 2, 1):
        lo = ir.Constant(ir.VectorType(_I32, LANES), [j if (j & b) == 0 else LANES + j - b for j in range(LANES)])
        hi = ir.Constant(ir.VectorType(_I32, LANES), [j + b if (j & b) == 0 else LANES + j for j in range(LANES)])
        new = list(rows)
        for i in range(LANES):
            if i & b:
                continue
            new[i] = builder.shuffle_vector(rows[i], rows[i + b], lo)
            new[i + b] = builder.shuffle_vector(rows[i], rows[i + b], hi)
        rows = new
    return rows


@intrinsic
def transpose16(typingctx, src, src_off, src_stride, dst, dst_off, dst_stride):  # noqa: ANN001, ANN201
    """Transpose one 16x16 fp32 block between two 1-D arrays.

    ``dst[dst_off + c * dst_stride + r] = src[src_off + r * src_stride + c]`` for
    ``r, c`` in ``range(16)``: 16 vector loads, 64 shuffles, 16 vector stores.
    """

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        so = context.cast(builder, args[1], sig.args[1], types.int64)
        ss = context.cast(builder, args[2], sig.args[2], types.int64)
        do = context.cast(builder, args[4], sig.args[4], types.int64)
        ds = context.cast(builder, args[5], sig.args[5], types.int64)
        rows = []
        for r in range(LANES):
            off = builder.add(so, builder.mul(ss, ir.Constant(_I64, r)))
            rows.append(builder.load(_vec_ptr(context, builder, sig.args[0], args[0], off, types.int64), align=4))
        cols = _transpose_network(builder, rows)
        for c in range(LANES):
            off = builder.add(do, builder.mul(ds, ir.Constant(_I64, c)))
            builder.store(cols[c], _vec_ptr(context, builder, sig.args[3], args[3], off, types.int64), align=4)
        return context.get_dummy_value()

    return types.none(src, src_off, src_stride, dst, dst_off, dst_stride), codegen


@intrinsic
def copy_n(typingctx, dst, dst_off, src, src_off, n):  # noqa: ANN001, ANN201
    """``dst[dst_off:dst_off+n] = src[src_off:src_off+n]`` as one memcpy (no overlap)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        d = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        s_ = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
        count = context.cast(builder, args[4], sig.args[4], types.int64)
        itemsize = ir.Constant(_I64, sig.args[0].dtype.bitwidth // 8)
        cgutils.raw_memcpy(builder, d, s_, count, itemsize)
        return context.get_dummy_value()

    return types.none(dst, dst_off, src, src_off, n), codegen


@intrinsic
def zero_n(typingctx, dst, dst_off, n):  # noqa: ANN001, ANN201
    """``dst[dst_off:dst_off+n] = 0`` as one memset."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        d = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        count = context.cast(builder, args[2], sig.args[2], types.int64)
        nbytes = builder.mul(count, ir.Constant(_I64, sig.args[0].dtype.bitwidth // 8))
        cgutils.memset(builder, d, nbytes, 0)
        return context.get_dummy_value()

    return types.none(dst, dst_off, n), codegen


@intrinsic
def deinterleave2(typingctx, src, src_off, dst0, off0, dst1, off1):  # noqa: ANN001, ANN201
    """Split 32 consecutive floats ``src[src_off:src_off+32]`` into the 16 even ones
    (to ``dst0[off0:off0+16]``) and the 16 odd ones (to ``dst1[off1:off1+16]``)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        so = context.cast(builder, args[1], sig.args[1], types.int64)
        v0 = builder.load(_vec_ptr(context, builder, sig.args[0], args[0], so, types.int64), align=4)
        so16 = builder.add(so, ir.Constant(_I64, LANES))
        v1 = builder.load(_vec_ptr(context, builder, sig.args[0], args[0], so16, types.int64), align=4)
        mask = ir.VectorType(_I32, LANES)
        even = builder.shuffle_vector(v0, v1, ir.Constant(mask, [2 * j for j in range(LANES)]))
        odd = builder.shuffle_vector(v0, v1, ir.Constant(mask, [2 * j + 1 for j in range(LANES)]))
        builder.store(even, _vec_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3]), align=4)
        builder.store(odd, _vec_ptr(context, builder, sig.args[4], args[4], args[5], sig.args[5]), align=4)
        return context.get_dummy_value()

    return types.none(src, src_off, dst0, off0, dst1, off1), codegen


def _vec_fn(builder, name, n_args):  # noqa: ANN001, ANN202
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * n_args), name)


def _splat(value: float) -> ir.Constant:
    """A vector constant with all 16 lanes equal to ``value``."""
    return ir.Constant(_VEC, [value] * LANES)


def _clamped(builder, x, lo: float, hi: float):  # noqa: ANN001, ANN202
    x = builder.call(_vec_fn(builder, "llvm.minnum.v16f32", 2), [x, _splat(hi)])
    return builder.call(_vec_fn(builder, "llvm.maxnum.v16f32", 2), [x, _splat(lo)])


def _horner(builder, coefs, x):  # noqa: ANN001, ANN202
    """coefs[0] x^(n-1) + ... + coefs[-1] by fused multiply-adds (highest power first)."""
    fma = _vec_fn(builder, "llvm.fma.v16f32", 3)
    p = _splat(coefs[0])
    for coef in coefs[1:]:
        p = builder.call(fma, [p, x, _splat(coef)])
    return p


@intrinsic
def vadd(typingctx, a, b):  # noqa: ANN001, ANN201
    """``a + b`` lane-wise."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fadd(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def vmul(typingctx, a, b):  # noqa: ANN001, ANN201
    """``a * b`` lane-wise."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fmul(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def vrsqrt(typingctx, a):  # noqa: ANN001, ANN201
    """``1 / sqrt(a)`` lane-wise (a square root and a division, not the approximate instruction)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fdiv(_splat(1.0), builder.call(_vec_fn(builder, "llvm.sqrt.v16f32", 1), [args[0]]))

    return f32x16(f32x16), codegen


@intrinsic
def vmax(typingctx, a, b):  # noqa: ANN001, ANN201
    """``max(a, b)`` lane-wise."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.call(_vec_fn(builder, "llvm.maxnum.v16f32", 2), [args[0], args[1]])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def vmin(typingctx, a, b):  # noqa: ANN001, ANN201
    """``min(a, b)`` lane-wise."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.call(_vec_fn(builder, "llvm.minnum.v16f32", 2), [args[0], args[1]])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def hmax(typingctx, v):  # noqa: ANN001, ANN201
    """The largest of the 16 lanes, as an fp32 scalar."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_VEC]), "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, [args[0]])

    return types.float32(f32x16), codegen


@intrinsic
def hsum(typingctx, v):  # noqa: ANN001, ANN201
    """The sum of the 16 lanes, as an fp32 scalar (a tree of adds)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        v = args[0]
        width = LANES
        while width > 1:  # halve: add the upper half onto the lower
            width //= 2
            hi = builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined),
                                        ir.Constant(ir.VectorType(_I32, LANES), [j + width if j < width else j for j in range(LANES)]))
            v = builder.fadd(v, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(f32x16), codegen


# exp(x) as in Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7
# polynomial, 2^n by building the float's exponent bits; relative error ~2 ulp.
_EXP_HI, _EXP_LO = 88.3762626647949, -87.3365447504019  # below: 2^n underflows; the result is ~1e-38
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


@intrinsic
def vexp(typingctx, x):  # noqa: ANN001, ANN201
    """``exp(x)`` lane-wise (relative error a few ulp; inputs below -87.3 give ~1e-38, not 0)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fma = _vec_fn(builder, "llvm.fma.v16f32", 3)
        x = _clamped(builder, args[0], _EXP_LO, _EXP_HI)
        n = builder.call(_vec_fn(builder, "llvm.floor.v16f32", 1), [builder.call(fma, [x, _splat(_LOG2E), _splat(0.5)])])
        r = builder.call(fma, [n, _splat(-_LN2_HI), x])
        r = builder.call(fma, [n, _splat(-_LN2_LO), r])
        p = _horner(builder, _EXP_POLY, r)
        p = builder.call(fma, [p, builder.fmul(r, r), builder.fadd(r, _splat(1.0))])
        vi = ir.VectorType(_I32, LANES)
        bits = builder.shl(builder.add(builder.fptosi(n, vi), ir.Constant(vi, [127] * LANES)), ir.Constant(vi, [23] * LANES))
        return builder.fmul(p, builder.bitcast(bits, _VEC))

    return f32x16(f32x16), codegen


# erf(x) as a rational function: x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) = 1 - 1.5e-8),
# the odd numerator of degree 13 and the even denominator of degree 8; measured absolute error
# 6.5e-8 in float64 arithmetic, 4.2e-7 in float32.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


@intrinsic
def verf(typingctx, x):  # noqa: ANN001, ANN201
    """``erf(x)`` lane-wise (absolute error below 5e-7)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        x = _clamped(builder, args[0], -4.0, 4.0)
        x2 = builder.fmul(x, x)
        return builder.fdiv(builder.fmul(x, _horner(builder, _ERF_P, x2)), _horner(builder, _ERF_Q, x2))

    return f32x16(f32x16), codegen
