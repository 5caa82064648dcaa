//! Reference checkpoint import/export through the real `nsa-infer` binary: the PyTorch
//! `Transformer`'s state_dict (`.pt` and safetensors, written by scripts/make_fixtures.py with
//! torch) plus its constructor arguments become a model directory whose logits equal the
//! reference's, in both attention modes; export writes the same tensors back.

mod common;

use std::path::Path;
use std::process::Command;

use burn::backend::NdArray;
use burn::prelude::*;
use common::{fixtures, small_vocab};
use nsa_model::interop::HostTensor;
use nsa_runtime::bundle::Bundle;
use nsa_runtime::reference::read_state_dict;
use safetensors::SafeTensors;

type B = NdArray<f32>;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nsa-infer"))
}

/// (ids, logits) of a fixture.
fn fixture_io(name: &str) -> (Tensor<B, 2, Int>, HostTensor) {
    let bytes = std::fs::read(fixtures().join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input").unwrap();
    let values: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let out = st.tensor("output").unwrap();
    let logits = HostTensor {
        shape: out.shape().to_vec(),
        values: out
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    };
    (
        Tensor::from_data(TensorData::new(values, shape), &Default::default()),
        logits,
    )
}

/// Largest absolute difference: infinite when either side has a NaN or infinity, panics on a
/// shape mismatch ([`nsa_model::Comparison`]).
fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    a.compare(b).expect("same shape").max_abs as f32
}

fn import(weights: &Path, args: &Path, out: &Path, vocab: &Path) {
    let o = bin()
        .args(["import", "--weights"])
        .arg(weights)
        .arg("--args")
        .arg(args)
        .arg("--tokenizer")
        .arg(vocab)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn export(model: &Path, out: &Path) {
    let o = bin()
        .args(["export", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn imported_reference_checkpoints_give_the_reference_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = small_vocab(tmp.path());
    for name in ["transformer_nsa", "transformer_full"] {
        for ext in ["pt", "state.safetensors"] {
            let out = tmp.path().join(format!("{name}-{ext}"));
            import(
                &fixtures().join(format!("{name}.{ext}")),
                &fixtures().join(format!("{name}.args.json")),
                &out,
                &vocab,
            );
            let bundle = Bundle::read(&out).unwrap();
            let model = bundle.model::<B>(&Default::default()).unwrap();
            let (ids, expected) = fixture_io(name);
            let n = ids.dims()[1];
            let logits = model.forward(ids.narrow(1, 0, n - 1));
            let err = max_diff(&HostTensor::from_tensor(logits), &expected);
            println!("{name} from .{ext}: max |logits - reference| = {err:.2e}");
            assert!(err <= 1e-4, "{name} from .{ext}: logits differ by {err}");
        }
    }
}

#[test]
fn export_writes_the_reference_tensors_back() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = small_vocab(tmp.path());
    let dir = tmp.path().join("model");
    let original = fixtures().join("transformer_nsa.pt");
    import(
        &original,
        &fixtures().join("transformer_nsa.args.json"),
        &dir,
        &vocab,
    );
    let out = tmp.path().join("exported");
    export(&dir, &out);
    assert_eq!(
        read_state_dict(&out.join("model.safetensors")).unwrap(),
        read_state_dict(&original).unwrap()
    );
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("transformer_nsa.args.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "num_tokens",
        "dim",
        "depth",
        "dim_head",
        "heads",
        "kv_heads",
        "use_sparse_attn",
    ] {
        assert_eq!(args[key], expected[key], "{key}");
    }
}

/// The reference NSA transformer fixture imported into `tmp/model` (with a small vocabulary).
fn imported_nsa_fixture(tmp: &Path) -> std::path::PathBuf {
    let vocab = small_vocab(tmp);
    let dir = tmp.join("model");
    import(
        &fixtures().join("transformer_nsa.pt"),
        &fixtures().join("transformer_nsa.args.json"),
        &dir,
        &vocab,
    );
    dir
}

#[test]
fn generation_on_the_cpu_is_reproducible_and_greedy_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = imported_nsa_fixture(tmp.path());
    let gen = |extra: &[&str]| {
        let o = bin()
            .args([
                "generate",
                "--backend",
                "ndarray",
                "--max-new-tokens",
                "40",
                "--prompt",
                "我们",
            ])
            .arg("--model")
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let a = gen(&["--seed", "3"]);
    assert_eq!(a, gen(&["--seed", "3"]), "same seed, same text");
    assert!(a.starts_with("我们"), "{a}");
    assert_ne!(a, gen(&["--seed", "4"]), "another seed, other text");
    assert_eq!(gen(&["--greedy"]), gen(&["--greedy", "--seed", "9"]));
    // split (f32-exact) matmuls are the same f32 products on the CPU: same greedy text
    assert_eq!(gen(&["--greedy"]), gen(&["--greedy", "--exact-matmul"]));
}

#[test]
fn compare_reports_the_block_selections_of_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = imported_nsa_fixture(tmp.path());
    // two CPU backends: the same blocks everywhere, logits within the tolerance
    let o = bin()
        .args(["compare", "--backends", "ndarray,cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("cpu: max |logits - ndarray|"), "{out}");
    // the fixture model has two NSA layers that select blocks
    for layer in [
        "layer 0: same blocks in every row",
        "layer 1: same blocks in every row",
    ] {
        assert!(out.contains(layer), "{out}");
    }
}

/// A model whose logits overflow on every backend fails the comparison (infinite logits differ
/// by NaN, which is not a zero difference). Weights that are not finite are refused when
/// loaded; these are finite but overflow the final norm's output.
#[test]
fn compare_fails_on_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = imported_nsa_fixture(tmp.path());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    // the final norm's weight: every logit depends on it
    let norm = tensors.iter_mut().find(|t| t.0 == "norm.weight").unwrap();
    for w in norm.2.chunks_exact_mut(4) {
        w.copy_from_slice(&3e38f32.to_le_bytes());
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, meta.metadata().clone()).unwrap();
    std::fs::write(&path, out).unwrap();
    let o = bin()
        .args(["compare", "--backends", "ndarray,cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("non-finite logit"), "{out}{err}");
}

/// A DSA checkpoint (the fixture of `scripts/dsa_reference.py`: its parameters as a state dict,
/// its settings as `dsa_kwargs`) imports to the fixture's logits, and export writes the same
/// tensors and arguments back.
#[test]
fn dsa_checkpoints_import_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = small_vocab(tmp.path());
    let name = "dsa_gqa_window_seq40";
    let bytes = std::fs::read(fixtures().join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut dict = nsa_model::interop::StateDict::new();
    for (key, t) in st.tensors() {
        if let Some(param) = key.strip_prefix("param.") {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            dict.insert(
                param.to_string(),
                HostTensor {
                    shape: t.shape().to_vec(),
                    values,
                },
            );
        }
    }
    let weights = tmp.path().join("dsa.safetensors");
    std::fs::write(
        &weights,
        nsa_runtime::reference::state_dict_bytes(&dict, None).unwrap(),
    )
    .unwrap();
    let args = tmp.path().join("args.json");
    let text = r#"{"num_tokens": 64, "dim": 32, "depth": 2, "dim_head": 8, "heads": 4,
        "kv_heads": 2, "dsa_kwargs": {"index_heads": 3, "index_dim_head": 12, "top_k": 6,
        "window": 4}}"#;
    std::fs::write(&args, text).unwrap();
    let dir = tmp.path().join("model");
    import(&weights, &args, &dir, &vocab);
    let model = Bundle::read(&dir)
        .unwrap()
        .model::<B>(&Default::default())
        .unwrap();
    let (ids, expected) = fixture_io(name);
    let n = ids.dims()[1];
    let logits = model.forward(ids.narrow(1, 0, n - 1));
    let err = max_diff(&HostTensor::from_tensor(logits), &expected);
    println!("{name}: max |logits - reference| = {err:.2e}");
    assert!(err <= 1e-4, "{name}: logits differ by {err}");

    let out = tmp.path().join("exported");
    export(&dir, &out);
    assert_eq!(
        read_state_dict(&out.join("model.safetensors")).unwrap(),
        dict
    );
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    let given: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(back["dsa_kwargs"], given["dsa_kwargs"]);
    assert_eq!(back["use_sparse_attn"], false);

    // both kinds at once is refused in one line
    let both = tmp.path().join("both.json");
    std::fs::write(
        &both,
        text.replace(
            "\"dsa_kwargs\"",
            "\"use_sparse_attn\": true, \"dsa_kwargs\"",
        ),
    )
    .unwrap();
    let o = bin()
        .args(["import", "--weights"])
        .arg(&weights)
        .arg("--args")
        .arg(&both)
        .arg("--tokenizer")
        .arg(&vocab)
        .arg("--out")
        .arg(tmp.path().join("refused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("two attention kinds"), "{err}");
}
