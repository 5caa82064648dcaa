use burn::backend::Autodiff;
#[allow(unused_imports)]
use burn::backend::NdArray;
use burn::module::AutodiffModule;
use burn::prelude::*;
use nsa_model::AttentionKind;
use nsa_train::config::{Preset, TrainConfig};
use nsa_train::lm::{LanguageModel, TokenBatch};
use std::time::Instant;

#[cfg(not(feature = "flex"))]
type B = Autodiff<NdArray<f32>>;
#[cfg(feature = "flex")]
type B = Autodiff<burn::backend::Flex>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let attn: AttentionKind = args
        .get(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(AttentionKind::Nsa);
    let vocab: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(21128);
    let batch: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(16);
    let mut c = TrainConfig::preset(Preset::Tiny);
    c.model.attention = attn;
    let mc = c.model_config(vocab).unwrap();
    let device = Default::default();
    let model = LanguageModel::new(mc.init::<B>(&device).unwrap(), 0.5);
    let ids: Vec<i64> = (0..batch * 129)
        .map(|i| ((i * 7919) % vocab) as i64)
        .collect();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, 129]), &device);
    for i in 0..3 {
        let s = Instant::now();
        let inner = model.valid();
        let l = inner.transformer.loss(t.clone().inner());
        let _ = l.into_scalar();
        let fwd = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let (_g, o) = model.gradients(TokenBatch {
            ids: t.clone(),
            micro_batches: 1,
            shard: 0,
            step: 0,
        });
        let fb = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let h = inner
            .transformer
            .hidden(t.clone().inner().narrow(1, 0, 128));
        let _ = h.into_data();
        let hid = s.elapsed().as_secs_f64();
        println!("{attn} vocab {vocab} iter {i}: forward {fwd:.3}s  hidden-only {hid:.3}s  fwd+bwd {fb:.3}s  loss {:.3}", o.loss_value);
    }
}
