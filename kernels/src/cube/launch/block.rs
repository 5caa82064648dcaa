//! One decode step of an NSA block as one operation: the launches of its parts in sequence.

use super::*;

/// The tensors of one [`decode_block`] (see `NsaKernels::decode_block`): absent biases and
/// norms `None`.
pub struct BlockTensors<T> {
    /// `[b, 1, dim]`.
    pub x: T,
    pub norm: Option<T>,
    pub w_qkv: T,
    pub b_qkv: Option<T>,
    pub w_gates: T,
    pub b_gates: Option<T>,
    pub cos: T,
    pub sin: T,
    /// `[k cache, v cache, k ring, v ring]`, written (in place where nothing else holds them).
    pub buffers: [T; 4],
    pub ck: T,
    pub cv: T,
    pub w_comb: T,
    pub b_comb: Option<T>,
    pub ff: Option<FfTensors<T>>,
}

/// The feed-forward of a [`BlockTensors`].
pub struct FfTensors<T> {
    pub norm: T,
    pub w1: T,
    pub b1: Option<T>,
    pub w2: T,
    pub b2: Option<T>,
}

/// Which optional tensors a flattened [`BlockTensors`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub norm: bool,
    pub b_qkv: bool,
    pub b_gates: bool,
    pub b_comb: bool,
    pub ff: Option<(bool, bool)>,
}

impl BlockLayout {
    /// Where the four buffers start among the flattened tensors.
    pub fn buffers_at(&self) -> usize {
        // x, norm?, w_qkv, b_qkv?, w_gates, b_gates?, cos, sin
        5 + usize::from(self.norm) + usize::from(self.b_qkv) + usize::from(self.b_gates)
    }
}

impl<T> BlockTensors<T> {
    /// The tensors in a fixed order, and which optional ones are there.
    pub fn flatten(self) -> (Vec<T>, BlockLayout) {
        let layout = BlockLayout {
            norm: self.norm.is_some(),
            b_qkv: self.b_qkv.is_some(),
            b_gates: self.b_gates.is_some(),
            b_comb: self.b_comb.is_some(),
            ff: self.ff.as_ref().map(|f| (f.b1.is_some(), f.b2.is_some())),
        };
        let mut v = vec![self.x];
        v.extend(self.norm);
        v.push(self.w_qkv);
        v.extend(self.b_qkv);
        v.push(self.w_gates);
        v.extend(self.b_gates);
        v.extend([self.cos, self.sin]);
        v.extend(self.buffers);
        v.extend([self.ck, self.cv, self.w_comb]);
        v.extend(self.b_comb);
        if let Some(f) = self.ff {
            v.extend([f.norm, f.w1]);
            v.extend(f.b1);
            v.push(f.w2);
            v.extend(f.b2);
        }
        (v, layout)
    }

    /// [`BlockTensors::flatten`] undone.
    pub fn unflatten(v: Vec<T>, l: &BlockLayout) -> Self {
        let mut it = v.into_iter();
        let mut next = || it.next().expect("a flattened block tensor");
        let x = next();
        let norm = l.norm.then(&mut next);
        let w_qkv = next();
        let b_qkv = l.b_qkv.then(&mut next);
        let w_gates = next();
        let b_gates = l.b_gates.then(&mut next);
        let (cos, sin) = (next(), next());
        let buffers = [next(), next(), next(), next()];
        let (ck, cv, w_comb) = (next(), next(), next());
        let b_comb = l.b_comb.then(&mut next);
        let ff = l.ff.map(|(b1, b2)| {
            let (norm, w1) = (next(), next());
            let b1 = b1.then(&mut next);
            let w2 = next();
            let b2 = b2.then(&mut next);
            FfTensors {
                norm,
                w1,
                b1,
                w2,
                b2,
            }
        });
        Self {
            x,
            norm,
            w_qkv,
            b_qkv,
            w_gates,
            b_gates,
            cos,
            sin,
            buffers,
            ck,
            cv,
            w_comb,
            b_comb,
            ff,
        }
    }
}

/// The launches of one [`decode_block`], each checked on its own.
#[derive(Clone, Debug)]
pub struct BlockProblem {
    /// `to_qkv` with the gate projection as its second matrix.
    pub pair: RowProblem,
    pub write: WriteProblem,
    pub decode: DecodeProblem,
    /// Compressed rows per part of the decode step's compressed branch ([`DECODE_SPAN`] for `0`).
    pub decode_span: usize,
    /// `combine_heads` with the residual.
    pub combine: RowProblem,
    /// `fc1` (normed, GELU) and `fc2` (residual).
    pub ff: Option<(RowProblem, RowProblem)>,
}

/// One decode step of an NSA block (see `NsaKernels::decode_block`): the launches of the
/// separate operations in sequence, as one operation of the caller's stream → the block's
/// output `[b, 1, dim]` and the written buffers.
pub fn decode_block<R: CubeRuntime>(
    t: BlockTensors<CubeTensor<R>>,
    p: &BlockProblem,
) -> (CubeTensor<R>, [CubeTensor<R>; 4]) {
    let (qkv, gates) = row_linear_pair(
        t.x.clone(),
        t.norm,
        t.w_qkv,
        t.b_qkv,
        None,
        Some((t.w_gates, t.b_gates)),
        &p.pair,
    );
    let gates = gates.expect("a second output");
    let (att, [kc, vc, tk, tv]) = decode_writing(
        [qkv, t.cos, t.sin, t.ck, t.cv, gates],
        t.buffers,
        &p.decode,
        &p.write,
        p.decode_span,
    );
    let h = row_linear(att, None, t.w_comb, t.b_comb, Some(t.x), &p.combine);
    let out = match (t.ff, &p.ff) {
        (Some(f), Some((p1, p2))) => {
            let hidden = row_linear(h.clone(), Some(f.norm), f.w1, f.b1, None, p1);
            row_linear(hidden, None, f.w2, f.b2, Some(h), p2)
        }
        _ => h,
    };
    (out, [kc, vc, tk, tv])
}
