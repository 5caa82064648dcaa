//! RMSNorm as `torch.nn.RMSNorm(dim)`: `x / sqrt(mean(x²) + eps) * weight`, `eps` = machine
//! epsilon of f32 (what PyTorch uses when `eps=None`).

use burn::module::Param;
use burn::prelude::*;

/// Root-mean-square normalisation over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale, `[dim]`, initialised to ones.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm over `dim` features with unit scale.
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps: f32::EPSILON as f64,
        }
    }

    /// `x`: `[..., dim]` → same shape.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let w = self.weight.val().unsqueeze::<D>();
        x.div(rms).mul(w)
    }

    /// The scale and epsilon as the fused kernels take them.
    pub fn row_norm(&self) -> crate::kernels::RowNorm<B> {
        crate::kernels::RowNorm {
            weight: self.weight.val(),
            eps: self.eps,
        }
    }
}
