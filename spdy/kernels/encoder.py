"""A transformer encoder's fused layer parts as fixed kernel calls, for one input shape and thread count.

A BERT layer has three parts that run as one fused kernel call each where their projections are
sparse (:class:`spdy.runtime.EncoderForward` decides which): the query, key and value projections
with the attention after them (:func:`spdy.kernels._spmm.qkv_forward`, then
:func:`spdy.kernels._attention.attention_forward` reading the projections in place), the attention
output projection with its residual and LayerNorm (:func:`spdy.kernels._spmm.residual_forward`),
and the feed-forward block (:func:`spdy.kernels._spmm.ffn_forward`). For a given model, input
shape and thread count, everything those calls take besides the mask is fixed: the weights'
arrays, the activation buffers, the kernels' scratch. :class:`EncoderPlan` makes all of it once,
so that a pass is a loop of kernel calls on argument lists built in advance, on buffers that
stay in the cache from pass to pass, with no checks and no allocations per call.

Buffers (flat fp32, 64-byte aligned): two hidden-state buffers that alternate from layer to layer
(layer ``i`` reads :meth:`EncoderPlan.input_of` and writes :meth:`EncoderPlan.output_of`), the
projections' output, the attention output and the attention block's output (the feed-forward's
input), each [batch x tokens, width] as a [batch, tokens, width] tensor lays it out.

A layer whose three parts all fuse can also run on the sparse kernels' tile layout
(:meth:`EncoderPlan.tiled_layer`, where the plan is ``tiled``): every part reads and writes
activations as the kernels compute them, in token tiles, so that consecutive such layers pass
their hidden state on without packing it into tiles and unpacking it again around every part;
the attention runs on the tiles too (:func:`spdy.kernels._attention.attention_tiles`). The
hidden state goes into tiles before the first layer of a run of such layers
(:meth:`EncoderPlan.pack_input`) and back into rows after its last (:meth:`EncoderPlan.unpack_output`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spdy.kernels import _attention, _spmm
from spdy.kernels._workspace import aligned_empty
from spdy.kernels.ffn import fused_threads, norm_args
from spdy.kernels.linear import PreparedLinear

#: A LayerNorm as the kernels' epilogues take it: (weight, bias, eps), fp32 arrays.
Norm = tuple[np.ndarray, np.ndarray, float]


@dataclass(frozen=True, eq=False)
class LayerKernels:
    """The parts of one encoder layer that run as fused kernel calls; None: the part runs otherwise.

    ``qkv``: the query, key and value projections (each ``heads * head_dim`` wide, ``head_dim`` a
    multiple of 32), then the attention with ``scale``. ``out``: the attention output projection
    and the LayerNorm after its residual. ``ffn``: the feed-forward's two projections (exact GELU
    between) and the LayerNorm after its residual. Every projection in a multithreaded sparse
    format (:data:`spdy.types.FUSED_FORMATS`).
    """

    qkv: tuple[PreparedLinear, PreparedLinear, PreparedLinear] | None
    heads: int
    head_dim: int
    scale: float
    out: tuple[PreparedLinear, Norm] | None
    ffn: tuple[PreparedLinear, PreparedLinear, Norm] | None

    @property
    def any(self) -> bool:
        """Whether any part runs as a fused kernel call."""
        return self.qkv is not None or self.out is not None or self.ffn is not None

    @property
    def all(self) -> bool:
        """Whether every part does."""
        return self.qkv is not None and self.out is not None and self.ffn is not None


class EncoderPlan:
    """The fused parts of every layer as argument lists of their kernels, with the buffers they use.

    ``layers``: one :class:`LayerKernels` per layer; ``batch`` sequences of ``tokens`` tokens, a
    hidden state ``width`` wide (the input of every layer and the output of the attention output
    projection and of the feed-forward); ``nthreads`` the threads the kernels use. ``tiled``:
    the layers whose parts all fuse also get their arguments for :meth:`tiled_layer`.
    """

    def __init__(self, layers: Sequence[LayerKernels], batch: int, tokens: int, width: int, nthreads: int,
                 tiled: bool = True) -> None:
        self.layers = tuple(layers)
        self.batch, self.tokens, self.width = batch, tokens, width
        self.tiled = bool(tiled) and any(self._tileable(lk) for lk in self.layers)
        # the layers run from rows of tokens: the tiled ones need none of the row buffers and arguments
        from_rows = [LayerKernels(None, lk.heads, lk.head_dim, lk.scale, None, None)
                     if self.tiled and self._tileable(lk) else lk for lk in self.layers]
        rows = batch * tokens
        n = fused_threads(rows, nthreads)
        proj = max([sum(p.out_features for p in lk.qkv) for lk in from_rows if lk.qkv] or [0])
        att = max([lk.heads * lk.head_dim for lk in from_rows if lk.qkv or lk.out] or [0])
        att = max([att] + [lk.out[0].in_features for lk in from_rows if lk.out])
        hidden = max([lk.ffn[0].out_features for lk in from_rows if lk.ffn] or [0])
        self._hidden = (aligned_empty(rows * width), aligned_empty(rows * width))
        self.projections = aligned_empty(max(1, rows * proj))
        self.attention_out = aligned_empty(max(1, rows * att))
        self.block_out = aligned_empty(rows * width)
        tile = _spmm.TILE
        XP = aligned_empty(n * tile * max(width, att))
        YP = aligned_empty(n * tile * max(width, proj))
        RP = aligned_empty(n * tile * width)
        HP = aligned_empty(max(1, n * tile * hidden))
        self._qkv: list[tuple | None] = []
        self._attention: list[tuple[tuple, tuple] | None] = []
        self._out: list[tuple | None] = []
        self._ffn: list[tuple | None] = []
        Tkp = _attention.padded_keys(tokens)
        works: dict[int, np.ndarray] = {}  # the attention's scratch, one per size, shared by the layers
        for i, lk in enumerate(from_rows):
            x, y = self.input_of(i), self.output_of(i)
            if lk.qkv is not None:
                q, k, v = lk.qkv
                a, b, c = q.sparse, k.sparse, v.sparse
                assert a is not None and b is not None and c is not None
                self._qkv.append((
                    x, rows, width, q.out_features, k.out_features, v.out_features,
                    a.ptr, a.n_panels, a.col, a.val, a.blocked, q.bias, b.ptr, b.n_panels, b.col, b.val, b.blocked,
                    k.bias, c.ptr, c.n_panels, c.col, c.val, c.blocked, v.bias, XP, YP, self.projections, n))
                W, D, H = q.out_features, lk.head_dim, lk.heads
                O = q.out_features + k.out_features + v.out_features
                n_att = max(1, min(nthreads, batch * H))
                size = n_att * (2 * D + 4) * Tkp
                work = works.get(size)
                if work is None:
                    work = works[size] = aligned_empty(size)
                bs, ts = tokens * O, O
                self._attention.append((
                    (self.projections, 0, bs, ts, self.projections, W, bs, ts, self.projections,
                     q.out_features + k.out_features, bs, ts, batch, H, tokens, tokens, D, float(lk.scale)),
                    (work, self.attention_out, n_att)))
            else:
                self._qkv.append(None)
                self._attention.append(None)
            if lk.out is not None:
                p, norm = lk.out
                s = p.sparse
                assert s is not None
                self._out.append((self.attention_out, x, rows, p.in_features, p.out_features, s.ptr, s.n_panels, s.col,
                                  s.val, s.blocked, p.bias, *norm_args(norm), XP, RP, YP, self.block_out, n))
            else:
                self._out.append(None)
            if lk.ffn is not None:
                up, down, norm = lk.ffn
                a, b = up.sparse, down.sparse
                assert a is not None and b is not None
                self._ffn.append((self.block_out, rows, up.in_features, up.out_features, down.out_features, a.ptr,
                                  a.n_panels, a.col, a.val, a.blocked, up.bias, b.ptr, b.n_panels, b.col, b.val,
                                  b.blocked, down.bias, True, *norm_args(norm), XP, HP, YP, y, n))
            else:
                self._ffn.append(None)
        self._tiled: list[tuple | None] = [None] * len(self.layers)
        if self.tiled:
            self._make_tiled(batch, tokens, width, nthreads)

    @staticmethod
    def _tileable(lk: LayerKernels) -> bool:
        """Whether :meth:`tiled_layer` runs layer ``lk``: all parts fused, the query, key and value
        projections one head width each."""
        if not lk.all:
            return False
        q, k, v = lk.qkv  # type: ignore[misc]
        return q.out_features == k.out_features == v.out_features == lk.heads * lk.head_dim

    def _make_tiled(self, batch: int, tokens: int, width: int, nthreads: int) -> None:
        Tpad = _spmm.padded_tokens_py(tokens)
        self.padded_tokens = Tpad
        rows = batch * Tpad
        units = batch * (-(-tokens // _spmm.TILE))
        n = max(1, min(nthreads, units))
        self._tiles_n = n
        tiled = [lk for lk in self.layers if self._tileable(lk)]
        proj = max(3 * lk.heads * lk.head_dim for lk in tiled)
        att = max(lk.heads * lk.head_dim for lk in tiled)
        hidden = max(lk.ffn[0].out_features for lk in tiled)  # type: ignore[index]
        self._hidden_tiles = (aligned_empty(rows * width), aligned_empty(rows * width))
        proj_t, att_t, block_t = aligned_empty(rows * proj), aligned_empty(rows * att), aligned_empty(rows * width)
        HP = aligned_empty(n * _spmm.TILE * hidden)
        works: dict[int, np.ndarray] = {}
        for i, lk in enumerate(self.layers):
            if not self._tileable(lk):
                continue
            xt, yt = self._hidden_tiles[i % 2], self._hidden_tiles[(i + 1) % 2]
            q, k, v = lk.qkv  # type: ignore[misc]
            a, b, c = q.sparse, k.sparse, v.sparse
            assert a is not None and b is not None and c is not None
            qkv = (xt, batch, tokens, Tpad, width, q.out_features, k.out_features, v.out_features,
                   a.ptr, a.n_panels, a.col, a.val, a.blocked, q.bias, b.ptr, b.n_panels, b.col, b.val, b.blocked,
                   k.bias, c.ptr, c.n_panels, c.col, c.val, c.blocked, v.bias, proj_t, n)
            H, D = lk.heads, lk.head_dim
            n_att = max(1, min(nthreads, batch * H * (-(-tokens // _spmm.TILE))))
            size = n_att * (Tpad + 3) * _spmm.TILE
            work = works.get(size)
            if work is None:
                work = works[size] = aligned_empty(size)
            att_args = ((proj_t, batch, tokens, Tpad, H, D, float(lk.scale)), (work, att_t, n_att))
            p, norm = lk.out  # type: ignore[misc]
            s = p.sparse
            assert s is not None
            out = (att_t, xt, batch, tokens, Tpad, p.in_features, p.out_features, s.ptr, s.n_panels, s.col, s.val,
                   s.blocked, p.bias, *norm_args(norm), block_t, n)
            up, down, norm = lk.ffn  # type: ignore[misc]
            a, b = up.sparse, down.sparse
            assert a is not None and b is not None
            ffn = (block_t, batch, tokens, Tpad, up.in_features, up.out_features, down.out_features, a.ptr,
                   a.n_panels, a.col, a.val, a.blocked, up.bias, b.ptr, b.n_panels, b.col, b.val, b.blocked,
                   down.bias, True, *norm_args(norm), HP, yt, n)
            self._tiled[i] = (qkv, att_args, out, ffn)

    def tiles_layer(self, i: int) -> bool:
        """Whether layer ``i`` runs as :meth:`tiled_layer`."""
        return self._tiled[i] is not None

    def pack_input(self, i: int, src: np.ndarray | None = None) -> None:
        """Layer ``i``'s input into the tile layout it reads in :meth:`tiled_layer`: from :meth:`input_of`,
        or from ``src`` (flat fp32 rows of the same shape)."""
        _spmm.pack_tiles(self.input_of(i) if src is None else src, self.batch, self.tokens, self.padded_tokens,
                         self.width, self._hidden_tiles[i % 2], self._tiles_n)

    def unpack_output(self, i: int, dst: np.ndarray | None = None) -> None:
        """Layer ``i``'s output from the tile layout :meth:`tiled_layer` wrote into :meth:`output_of`, or
        into ``dst`` (flat fp32 rows of the same shape)."""
        _spmm.unpack_tiles(self._hidden_tiles[(i + 1) % 2], self.batch, self.tokens, self.padded_tokens,
                           self.width, self.output_of(i) if dst is None else dst, self._tiles_n)

    def tiled_layer(self, i: int, key_bias: np.ndarray | None) -> None:
        """Layer ``i`` (one of :meth:`tiles_layer`) on the tile layout: its input tiles (the previous
        tiled layer's output, or :meth:`pack_input`) to its output tiles. ``key_bias``: each key's
        additive score, [batch, keys] with a row stride of :func:`~spdy.kernels._attention.padded_keys`
        (the mask is the same for every query), or None."""
        qkv, (pre, post), out, ffn = self._tiled[i]  # type: ignore[misc]
        _spmm.qkv_tiles(*qkv)
        if key_bias is None:
            _attention.attention_tiles(*pre, post[0][:16], 0, False, *post)
        else:
            _attention.attention_tiles(*pre, key_bias, _attention.padded_keys(self.tokens), True, *post)
        _spmm.residual_tiles(*out)
        _spmm.ffn_tiles(*ffn)

    def input_of(self, i: int) -> np.ndarray:
        """The buffer layer ``i`` reads its input from (the previous layer's output)."""
        return self._hidden[i % 2]

    def output_of(self, i: int) -> np.ndarray:
        """The buffer layer ``i`` writes its output to."""
        return self._hidden[(i + 1) % 2]

    def attention(self, i: int, bias: np.ndarray | None) -> None:
        """Layer ``i``'s projections and attention: :meth:`input_of` -> :attr:`attention_out`.
        ``bias``: the mask's additive scores (:func:`spdy.kernels.attention.mask_bias`) or None."""
        pre, post = self._attention[i]  # type: ignore[misc]
        _spmm.qkv_forward(*self._qkv[i])  # type: ignore[misc]
        if bias is None:
            _attention.attention_forward(*pre, post[0][:16], False, *post)
        else:
            _attention.attention_forward(*pre, bias.reshape(-1), True, *post)

    def attention_output(self, i: int) -> None:
        """Layer ``i``'s attention output block: :attr:`attention_out` and :meth:`input_of` ->
        :attr:`block_out`."""
        _spmm.residual_forward(*self._out[i])  # type: ignore[misc]

    def feed_forward(self, i: int) -> None:
        """Layer ``i``'s feed-forward block: :attr:`block_out` -> :meth:`output_of`."""
        _spmm.ffn_forward(*self._ffn[i])  # type: ignore[misc]
