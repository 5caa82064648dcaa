//! The Learner's data loaders: validation windows cover the split exactly, training batches
//! are a pure function of the global step, epochs start where the cursor says.

mod common;

use std::sync::Arc;

use burn::backend::NdArray;
use burn::data::dataloader::DataLoader;
use burn::prelude::*;
use nsa_runtime::tokenizer::bert_base_chinese;
use nsa_train::corpus::{eval_tail, split, CorpusSource, TokenCache};
use nsa_train::data::{
    sample_prime, unigram_entropy, validation_windows, StepCursor, TrainBatches, ValidBatches,
};

type B = NdArray<f32>;

fn cache(dir: &std::path::Path) -> Arc<TokenCache> {
    let corpus = common::small_corpus(dir, 300);
    let (cache, _) = TokenCache::load_or_build(
        &CorpusSource::Paths(vec![corpus]),
        &bert_base_chinese(),
        dir.join("cache"),
    )
    .unwrap();
    Arc::new(cache)
}

fn ids(t: Tensor<B, 2, Int>) -> Vec<u32> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn validation_windows_cover_the_split_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let (_, valid) = split(cache.len(), 0.1).unwrap();
    assert!(valid.len() > 1000, "{}", valid.len());
    for seq_len in [7usize, 32, 128] {
        let windows = validation_windows(valid.clone(), seq_len, 0);
        assert!(!windows.is_empty());
        assert_eq!(windows[0], valid.start);
        for w in windows.windows(2) {
            // the targets of consecutive windows are adjacent: none twice, none skipped
            assert_eq!(w[1], w[0] + seq_len);
        }
        let last = *windows.last().unwrap();
        assert!(last + seq_len < valid.end, "window reads past the split");
        // what the windows leave out is one short tail, shorter than a window
        let covered = windows.len() * seq_len;
        let tail = eval_tail(valid.clone(), seq_len).map_or(0, |t| t.len() - 1);
        assert_eq!(covered + tail, valid.len() - 1);
        assert!(tail < seq_len);

        // the loader yields exactly these windows, in batches
        let loader = ValidBatches::<B>::new(
            cache.clone(),
            windows.clone(),
            seq_len,
            5,
            Default::default(),
        );
        let mut iter = loader.iter();
        let mut seen = Vec::new();
        for batch in iter.by_ref() {
            assert_eq!(batch.micro_batches, 1);
            let [rows, width] = batch.ids.dims();
            assert_eq!(width, seq_len + 1);
            assert!(rows <= 5);
            seen.extend(ids(batch.ids));
        }
        let p = iter.progress();
        assert_eq!(p.items_processed, p.items_total);
        let expected: Vec<u32> = windows
            .iter()
            .flat_map(|&s| cache.get(s..s + seq_len + 1))
            .collect();
        assert_eq!(seen, expected);
    }
    // an evenly spread subset
    let all = validation_windows(valid.clone(), 32, 0);
    let some = validation_windows(valid.clone(), 32, 5);
    assert_eq!(some.len(), 5);
    assert!(some.windows(2).all(|w| w[0] < w[1]));
    assert!(some.iter().all(|s| all.contains(s)));
    assert_eq!(some[0], all[0]);
}

#[test]
fn training_batches_are_a_function_of_the_global_step() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let (train, _) = split(cache.len(), 0.1).unwrap();
    let seq_len = 16;
    let cursor = StepCursor::new(0);
    let make = |seed, cursor: StepCursor| {
        TrainBatches::<B>::new(
            cache.clone(),
            train.clone(),
            seq_len,
            seed,
            2,
            3,
            10,
            4,
            cursor,
            Default::default(),
        )
        .unwrap()
    };
    let loader = make(7, cursor.clone());
    assert_eq!(loader.rows(), 6);

    // epoch boundaries: [0, 4), [4, 8), [8, 10)
    let steps_of = |start: u64| -> (Vec<Vec<u32>>, usize, usize) {
        cursor.set(start);
        let mut iter = loader.iter();
        let first = iter.progress();
        let mut batches = Vec::new();
        for b in iter.by_ref() {
            assert_eq!(b.micro_batches, 3);
            assert_eq!(b.ids.dims(), [6, seq_len + 1]);
            batches.push(ids(b.ids));
        }
        (batches, first.items_processed, first.items_total)
    };
    let (e1, p1, t1) = steps_of(0);
    let (e2, _, _) = steps_of(4);
    let (e3, _, t3) = steps_of(8);
    assert_eq!((e1.len(), e2.len(), e3.len()), (4, 4, 2));
    assert_eq!((p1, t1, t3), (0, 4, 2));
    // resuming in the middle of an epoch continues with the same batches
    let (mid, p_mid, t_mid) = steps_of(5);
    assert_eq!(mid, e2[1..]);
    assert_eq!((p_mid, t_mid), (1, 4));

    // every batch is the cache's tokens at the sampler's windows, inside the training split
    for (k, batch) in e1.iter().chain(&e2).chain(&e3).enumerate() {
        let starts = loader.starts(k as u64);
        let expected: Vec<u32> = starts
            .iter()
            .flat_map(|&s| {
                assert!(s >= train.start && s + seq_len < train.end);
                cache.get(s..s + seq_len + 1)
            })
            .collect();
        assert_eq!(batch, &expected);
    }
    // another loader with the same seed gives the same data; another seed other data
    let again = make(7, StepCursor::new(0));
    assert_eq!(ids(again.batch(9).ids), e3[1]);
    let other = make(8, StepCursor::new(0));
    assert_ne!(ids(other.batch(0).ids), e1[0]);
}

#[test]
fn unigram_entropy_and_sample_prime() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let (train, valid) = split(cache.len(), 0.1).unwrap();
    let (h, distinct) = unigram_entropy(&cache, train.clone());
    let mut counts = std::collections::HashMap::new();
    for t in cache.get(train.clone()) {
        *counts.entry(t).or_insert(0u64) += 1;
    }
    let n = train.len() as f64;
    let expected: f64 = counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    assert!((h - expected).abs() < 1e-9, "{h} {expected}");
    assert_eq!(distinct, counts.len());
    assert!(h > 4.0 && h < (distinct as f64).ln());

    let a = sample_prime(&cache, valid.clone(), 64, 1, 10);
    assert_eq!(a.len(), 64);
    assert_eq!(a, sample_prime(&cache, valid.clone(), 64, 1, 10));
    assert_ne!(a, sample_prime(&cache, valid.clone(), 64, 1, 11));
    let s = (valid.start..valid.end - 63)
        .find(|&s| cache.get(s..s + 64) == a)
        .expect("the prime is a validation window");
    assert!(s >= valid.start);
}
