//! Multi-head attention in one parallel pass over the token matrices the projections write.
//!
//! The composition splits `q`, `k` and `v` into heads (three transposed copies), concatenates
//! shared keys (EchoMimic's reference bank, broadcast to every frame) onto the frames' own,
//! materialises the scores of a chunk of queries, scales and soft-maxes them into fresh
//! tensors, multiplies by `v` and merges the heads back (a fourth copy); the motion module
//! adds two transposes around all that to attend over frames. Each of those is its own
//! parallel region and its own fresh buffer.
//!
//! The CPU kernel reads `q`, `k` and `v` where the projections wrote them (`[rows, heads·d]`
//! matrices; a sequence is any evenly strided set of rows, so attention over the frames of
//! every spatial position needs no transpose) and writes each head's result straight into
//! its columns of the output. Each parallel task owns a contiguous run of output rows (a
//! block of one item's queries; for attention over frames, one video's rows): per head and
//! block of queries, the product writes the scores of every key segment side by side into a
//! buffer the task reuses, the rows are soft-maxed in place (scale folded in, the
//! vectorisable `exp`), and the product adds `p·v` of each segment into the output. Nothing
//! but the output is allocated per call.
//!

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::chunked::{attention as sdpa, merge_heads, split_heads};
use super::cpu_input::tensor_f32;
use super::matmul::{matmul, View};
use super::softmax::softmax_in_place;

/// Scores held per task at most (256 Ki f32 = 1 MiB, within a core's L2): the query block
/// is as many rows as fit, at least one.
const SCORE_BLOCK_ELEMS: usize = 256 * 1024;

/// Keys and values of width `heads·d` shared by every item from `from_item` on: `[1, L, C]`.
///
/// EchoMimic's reference bank: the conditional rows of a CFG batch attend over their own
/// tokens and the reference image's, the unconditional rows over their own only.
#[derive(Debug, Clone, Copy)]
pub struct SharedKv<'a> {
    /// `to_k` of the shared tokens, `[1, L, heads·d]`.
    pub k: &'a Tensor,
    /// `to_v` of the shared tokens, `[1, L, heads·dv]`.
    pub v: &'a Tensor,
    /// First item that sees them.
    pub from_item: usize,
}

/// `merge_heads(softmax(q_h·[k_h, shared_k_h]ᵀ·scale)·[v_h, shared_v_h])` for `q` `[N, Lq, H·d]`,
/// `k` `[N, Lk, H·d]`, `v` `[N, Lk, H·dv]` and optional [`SharedKv`]: `[N, Lq, H·dv]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shared: Option<SharedKv<'_>>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let n = q.dim(0)?;
    let (nk, lk, _) = k.dims3()?;
    if nk != n || v.dims3()?.0 != n || v.dim(1)? != lk {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not pair up",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(s) = shared {
        if s.k.dims3()?.0 != 1 || s.v.dims3()?.0 != 1 || s.k.dim(1)? != s.v.dim(1)? {
            candle_core::bail!(
                "attention: shared keys {:?} and values {:?} must be one item of equal length",
                s.k.dims(),
                s.v.dims()
            );
        }
    }
    check_widths(q, k, v, shared, heads)?;
    if super::switch::use_cpu_kernel(q) {
        return fused(q, k, v, shared, heads, scale, Layout::Rows);
    }
    // The composition: items that see the shared tokens and items that do not, in turn.
    let from = shared.map_or(n, |s| s.from_item.min(n));
    let mut parts = Vec::with_capacity(2);
    if from > 0 {
        let (q, k, v) = (
            q.narrow(0, 0, from)?,
            k.narrow(0, 0, from)?,
            v.narrow(0, 0, from)?,
        );
        parts.push(composed(&q, &k, &v, heads, scale)?);
    }
    if let (Some(s), true) = (shared, from < n) {
        let rest = n - from;
        let widen = |own: &Tensor, shared: &Tensor| -> Result<Tensor> {
            let (_, l, c) = shared.dims3()?;
            Tensor::cat(
                &[
                    &own.narrow(0, from, rest)?,
                    &shared.broadcast_as((rest, l, c))?,
                ],
                1,
            )
        };
        let (k, v) = (widen(k, s.k)?, widen(v, s.v)?);
        parts.push(composed(&q.narrow(0, from, rest)?, &k, &v, heads, scale)?);
    }
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// Attention over the `frames` rows of every position: `q`, `k`, `v` are `[B·F, L, H·d]`
/// (frame-major rows `b·F + f`), each of the `B·L` sequences is one position's `F` frames;
/// the result has the same layout, `[B·F, L, H·dv]` (the motion module's temporal
/// self-attention, without transposing to `[B·L, F, C]` and back).
pub fn frame_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    frames: usize,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (bf, l, _) = q.dims3()?;
    if frames == 0 || bf % frames != 0 {
        candle_core::bail!("{bf} rows are not a whole number of {frames}-frame videos");
    }
    if k.dims3()?.0 != bf || k.dim(1)? != l || v.dims3()?.0 != bf || v.dim(1)? != l {
        candle_core::bail!(
            "frame attention: q {:?}, k {:?} and v {:?} do not pair up",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let b = bf / frames;
    check_widths(q, k, v, None, heads)?;
    if super::switch::use_cpu_kernel(q) {
        return fused(q, k, v, None, heads, scale, Layout::Frames(frames));
    }
    let to_seq = |x: &Tensor| -> Result<Tensor> {
        let c = x.dim(2)?;
        x.reshape((b, frames, l, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * l, frames, c))
    };
    let out = composed(&to_seq(q)?, &to_seq(k)?, &to_seq(v)?, heads, scale)?;
    let c = out.dim(2)?;
    out.reshape((b, l, frames, c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((bf, l, c))
}

/// The plain candle composition: split heads, chunked attention, merge heads.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let split = |x: &Tensor| split_heads(x, heads);
    merge_heads(&sdpa(&split(q)?, &split(k)?, &split(v)?, scale)?)
}

/// The widths of `q`, `k`, `v` (and the shared keys and values) split into `heads` heads
/// alike: checked before either implementation runs.
fn check_widths(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shared: Option<SharedKv<'_>>,
    heads: usize,
) -> Result<()> {
    let (cq, ck, cv) = (q.dim(2)?, k.dim(2)?, v.dim(2)?);
    if heads == 0 || cq % heads != 0 || cv % heads != 0 || ck != cq {
        candle_core::bail!(
            "attention: widths q {cq}, k {ck}, v {cv} do not split into {heads} heads"
        );
    }
    if let Some(s) = shared {
        if s.k.dim(2)? != ck || s.v.dim(2)? != cv {
            candle_core::bail!(
                "attention: shared keys {:?} / values {:?} are not {ck} / {cv} wide",
                s.k.dims(),
                s.v.dims()
            );
        }
    }
    Ok(())
}

/// How the sequences lie in the `[rows, width]` token matrices.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// `[N, L, C]`: item `i` is rows `i·L .. (i+1)·L`.
    Rows,
    /// `[B·F, L, C]` attended over its `F` frames: position `l` of video `b` is rows
    /// `b·F·L + f·L + l`.
    Frames(usize),
}

fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shared: Option<SharedKv<'_>>,
    heads: usize,
    scale: f64,
    layout: Layout,
) -> Result<Tensor> {
    let (rows, lq, cq) = q.dims3()?;
    let (lk, cv) = (k.dim(1)?, v.dim(2)?);
    let mut out = vec![0f32; rows * lq * cv];
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let shared = shared
        .map(|s| Ok::<_, candle_core::Error>((s.k.contiguous()?, s.v.contiguous()?, s.from_item)))
        .transpose()?;
    {
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let shared_storage = shared
            .as_ref()
            .map(|(sk, sv, _)| (sk.storage_and_layout().0, sv.storage_and_layout().0));
        let shared = match (&shared, &shared_storage) {
            (Some((sk, sv, from)), Some((skg, svg))) => Some(Shared {
                k: tensor_f32(sk, skg)?,
                v: tensor_f32(sv, svg)?,
                len: sk.dim(1)?,
                from_item: *from,
            }),
            _ => None,
        };
        let heads = Heads {
            q: tensor_f32(&q, &qs)?,
            k: tensor_f32(&k, &ks)?,
            v: tensor_f32(&v, &vs)?,
            shared,
            count: heads,
            d: cq / heads,
            dv: cv / heads,
            scale: scale as f32,
        };
        match layout {
            Layout::Rows => heads.rows(&mut out, rows, lq, lk),
            Layout::Frames(frames) => heads.frames(&mut out, rows / frames, frames, lq),
        }
    }
    Tensor::from_vec(out, (rows, lq, cv), &Device::Cpu)
}

/// Shared keys and values as the kernel reads them.
struct Shared<'a> {
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
    from_item: usize,
}

/// One key/value segment of one head: `kᵀ` (`d × len`) and `v` (`len × dv`).
type Segment<'a> = (View<'a>, View<'a>);

/// The inputs of one call, split into heads on the fly.
struct Heads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    shared: Option<Shared<'a>>,
    count: usize,
    d: usize,
    dv: usize,
    scale: f32,
}

impl Heads<'_> {
    /// Queries of `head` from row `row`, `len` of them `step` rows apart.
    fn queries(&self, head: usize, row: usize, len: usize, step: usize) -> View<'_> {
        let c = self.count * self.d;
        View {
            data: &self.q[row * c + head * self.d..],
            rows: len,
            cols: self.d,
            row_stride: step * c,
            col_stride: 1,
        }
    }

    /// `kᵀ` and `v` of `head` for `len` keys from row `row` of `k`/`v`, `step` rows apart.
    fn segment<'s>(
        &self,
        (k, v): (&'s [f32], &'s [f32]),
        head: usize,
        row: usize,
        len: usize,
        step: usize,
    ) -> Segment<'s> {
        let (ck, cv) = (self.count * self.d, self.count * self.dv);
        (
            View {
                data: &k[row * ck + head * self.d..],
                rows: self.d,
                cols: len,
                row_stride: 1,
                col_stride: step * ck,
            },
            View {
                data: &v[row * cv + head * self.dv..],
                rows: len,
                cols: self.dv,
                row_stride: step * cv,
                col_stride: 1,
            },
        )
    }

    /// `[N, L, C]` items: one task per block of one item's queries (its own output rows).
    fn rows(&self, out: &mut [f32], items: usize, lq: usize, lk: usize) {
        let cv = self.count * self.dv;
        let keys_max = lk + self.shared.as_ref().map_or(0, |s| s.len);
        if items == 0 || lq == 0 || keys_max == 0 {
            return;
        }
        let block = (SCORE_BLOCK_ELEMS / keys_max).clamp(1, lq);
        out.par_chunks_mut(lq * cv)
            .enumerate()
            .flat_map(|(item, o)| {
                o.par_chunks_mut(block * cv)
                    .enumerate()
                    .map(move |(b, o)| (item, b * block, o))
            })
            .for_each_init(
                || vec![0f32; block * keys_max],
                |scores, (item, r0, o)| {
                    let m = o.len() / cv;
                    for head in 0..self.count {
                        let q = self.queries(head, item * lq + r0, m, 1);
                        let own = self.segment((self.k, self.v), head, item * lk, lk, 1);
                        let dst = &mut o[head * self.dv..];
                        match &self.shared {
                            Some(s) if item >= s.from_item => {
                                let bank = self.segment((s.k, s.v), head, 0, s.len, 1);
                                self.block(q, &[own, bank], scores, dst, cv);
                            }
                            _ => self.block(q, &[own], scores, dst, cv),
                        }
                    }
                },
            );
    }

    /// `[B·F, L, C]` attended over frames: one task per video (its `F·L` output rows).
    fn frames(&self, out: &mut [f32], videos: usize, frames: usize, positions: usize) {
        let cv = self.count * self.dv;
        if videos == 0 || frames == 0 || positions == 0 {
            return;
        }
        out.par_chunks_mut(frames * positions * cv)
            .enumerate()
            .for_each_init(
                || vec![0f32; frames * frames],
                |scores, (b, o)| {
                    for l in 0..positions {
                        let row = b * frames * positions + l;
                        for head in 0..self.count {
                            let q = self.queries(head, row, frames, positions);
                            let own = self.segment((self.k, self.v), head, row, frames, positions);
                            let dst = &mut o[l * cv + head * self.dv..];
                            self.block(q, &[own], scores, dst, positions * cv);
                        }
                    }
                },
            );
    }

    /// `dst[i] = softmax(q_i·[kᵀ…]·scale)·[v…]` for the `q.rows` queries, `dst` rows
    /// `dst_stride` apart.
    fn block(
        &self,
        q: View<'_>,
        segments: &[Segment<'_>],
        scores: &mut [f32],
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let m = q.rows;
        let keys: usize = segments.iter().map(|(kt, _)| kt.cols).sum();
        let scores = &mut scores[..m * keys];
        let mut col = 0;
        for (kt, _) in segments {
            matmul(&mut scores[col..], keys, q, *kt, false, 1);
            col += kt.cols;
        }
        for row in scores.chunks_exact_mut(keys) {
            softmax_in_place(row, self.scale);
        }
        let mut col = 0;
        for (i, (_, v)) in segments.iter().enumerate() {
            let p = View {
                data: &scores[col..],
                rows: m,
                cols: v.rows,
                row_stride: keys,
                col_stride: 1,
            };
            matmul(dst, dst_stride, p, *v, i > 0, 1);
            col += v.rows;
        }
    }
}
