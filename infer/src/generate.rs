//! `nsa-infer generate`: prompts in, continuations out, on whichever backend was chosen.
//!
//! Generation of one prompt stops, in this order of checks after every token:
//! 1. the end-of-document token (`[SEP]`, what every training document ended with) unless
//!    `ignore_eos`;
//! 2. a stop string appearing in the continuation (the continuation is cut before it; text
//!    that might be the start of a stop string is held back until it is not);
//! 3. `max_new` tokens (special tokens count, but are not printed);
//! 4. the model's context (`max_seq_len`) is full.
//!
//! The output is the streamed text (the prompt first unless `no_echo`), or with `json` one
//! JSON object per prompt: the continuation, every token with its id, text and
//! log-probability, and why it stopped.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::prelude::*;
use nsa_model::interop::StateDict;
use nsa_model::kernels::KernelOptions;
use nsa_model::{Generated, Sampling, Transformer, TransformerConfig};
use nsa_runtime::backend::{BackendChoice, OnBackend};
use nsa_runtime::tokenizer::Tokenizer;
use serde::Serialize;

use crate::memory::{check_cache_fits, MemoryStats};
use crate::run::{generation_room, model, prompt_ids};
use crate::stream::Streamer;
use nsa_runtime::backend::free_memory;

/// One prompt and where it came from (for errors: `--prompts FILE line 3`).
pub struct Prompt {
    /// The text.
    pub text: String,
    /// Where it was read.
    pub origin: String,
}

/// Where the prompts come from.
pub enum Prompts {
    /// These prompts, one generation each.
    Given(Vec<Prompt>),
    /// Lines read from stdin until its end, the model kept loaded.
    Interactive,
}

/// What ends a generation besides its length.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// The end-of-document token, when generation stops there.
    pub eos: Option<u32>,
    /// Stop strings.
    pub strings: Vec<String>,
}

/// Why one generation ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum StopReason {
    /// The end-of-document token.
    Eos,
    /// A stop string (given).
    Stop(String),
    /// `max_new` tokens.
    Length,
    /// The model's context is full.
    Context,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Eos => f.write_str("end of document ([SEP]; --ignore-eos goes on)"),
            Self::Stop(s) => write!(f, "stop string {s:?}"),
            Self::Length => f.write_str("--max-new-tokens reached"),
            Self::Context => f.write_str("the model's context (max_seq_len) is full"),
        }
    }
}

/// Generation of one or more prompts.
pub struct GenerateJob {
    /// Model config.
    pub config: TransformerConfig,
    /// Weights (reference naming).
    pub weights: StateDict,
    /// How the model runs (fused kernels, exact products).
    pub options: KernelOptions,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// The prompts.
    pub prompts: Prompts,
    /// Do not prepend the document separator.
    pub raw_prompt: bool,
    /// New tokens per prompt, at most.
    pub max_new: usize,
    /// What else stops a generation.
    pub stops: Stops,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Seed of the first prompt (prompt `i` uses `seed + i`).
    pub seed: u64,
    /// Print the prompt before its continuation.
    pub echo_prompt: bool,
    /// JSON objects instead of text.
    pub json: bool,
    /// Process start, for the time to first token.
    pub started: Instant,
    /// Sample the memory held (`--stats`).
    pub stats: bool,
}

/// What a generation run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateReport {
    /// Seconds from process start to the first generated token.
    pub first_token_s: Option<f64>,
    /// Tokens generated.
    pub tokens: usize,
    /// Of those, special tokens (not printed).
    pub special: usize,
    /// Seconds spent generating (all prompts).
    pub generate_s: f64,
    /// Why each prompt's generation ended.
    pub stops: Vec<StopReason>,
    /// The memory held, with `--stats`: sampled after each prompt's first token (the prefill's
    /// working set is then at its largest) and at its end.
    pub memory: Option<MemoryStats>,
}

/// One generated token in the JSON output.
#[derive(Debug, Clone, Serialize)]
struct TokenOut {
    id: u32,
    text: String,
    logprob: Option<f64>,
}

/// One prompt's result in the JSON output.
#[derive(Debug, Clone, Serialize)]
struct PromptOut<'a> {
    prompt: &'a str,
    text: String,
    tokens: Vec<TokenOut>,
    stop: StopReason,
    prompt_tokens: usize,
    seed: u64,
}

/// Decides when to stop and what of the continuation may be printed. It looks at the whole
/// decoded continuation after every token (which may change behind its end: a byte-level
/// tokenizer shows an incomplete character as U+FFFD until its last byte arrives), keeps what it
/// has printed, and holds back a trailing U+FFFD and any tail that may become a stop string.
struct Stopper<'a> {
    stops: &'a Stops,
    /// What has been printed of the continuation.
    emitted: String,
    reason: Option<StopReason>,
}

impl<'a> Stopper<'a> {
    fn new(stops: &'a Stops) -> Self {
        Self {
            stops,
            emitted: String::new(),
            reason: None,
        }
    }

    /// After token `id` made the continuation `text`: the text to print now (none of a stop
    /// string, nor what may become one), and whether to stop.
    fn push(&mut self, id: u32, text: &str) -> (String, bool) {
        if self.stops.eos == Some(id) {
            self.reason = Some(StopReason::Eos);
            return (self.rest(text), true);
        }
        // the earliest stop string in the continuation
        let found = self
            .stops
            .strings
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, s)) = found {
            self.reason = Some(StopReason::Stop(s.clone()));
            return (self.emit(&text[..at]), true);
        }
        // hold back an incomplete character and a tail that is the start of a stop string
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        for s in &self.stops.strings {
            for (i, _) in text.char_indices().rev().take(s.chars().count()) {
                if s.starts_with(&text[i..]) {
                    safe = safe.min(i);
                }
            }
        }
        (self.emit(&text[..safe]), false)
    }

    /// Everything not printed yet (at the end of a generation that did not stop on a string).
    fn rest(&mut self, text: &str) -> String {
        self.emit(text)
    }

    /// What to print so that the printed text becomes `upto` (a prefix of the continuation):
    /// its part after what was printed. Printed text cannot be taken back: where the
    /// continuation changed behind what was printed, the change is printed after it.
    fn emit(&mut self, upto: &str) -> String {
        if self.emitted.starts_with(upto) {
            return String::new();
        }
        // the common prefix (equal characters have equal byte offsets in both)
        let common = self
            .emitted
            .char_indices()
            .zip(upto.chars())
            .find(|((_, a), b)| a != b)
            .map_or(self.emitted.len().min(upto.len()), |((i, _), _)| i);
        let out = upto[common..].to_string();
        self.emitted = upto.to_string();
        out
    }
}

impl GenerateJob {
    /// Generates the continuation of `prompt` (seed `seed`), printing it as it comes (text
    /// mode) or as one JSON line at the end.
    #[allow(clippy::too_many_arguments)]
    fn one<B: Backend>(
        &self,
        model: &Transformer<B>,
        device: &B::Device,
        place: (Option<u64>, &BackendChoice),
        prompt: &str,
        seed: u64,
        report: &mut GenerateReport,
    ) -> Result<()> {
        let ids = prompt_ids(&self.tokenizer, prompt, self.raw_prompt)?;
        let max_new = self.max_new.min(generation_room(&self.config, ids.len())?);
        let (free, choice) = place;
        check_cache_fits::<B>(&self.config, ids.len(), max_new, free, choice)?;
        let mut memory = report.memory.take();
        let mut first = true;
        let mut out = std::io::stdout().lock();
        if self.echo_prompt && !self.json {
            write!(out, "{prompt}")?;
            out.flush()?;
        }
        let mut streamer = Streamer::new(&self.tokenizer);
        let mut stopper = Stopper::new(&self.stops);
        let mut tokens = Vec::new();
        let mut write_error = None;
        let started = self.started;
        let json = self.json;
        let new =
            model.generate_with(&ids, max_new, &self.sampling, seed, json, |g: Generated| {
                report
                    .first_token_s
                    .get_or_insert_with(|| started.elapsed().as_secs_f64());
                if first {
                    first = false;
                    if let Some(m) = memory.as_mut() {
                        m.sample(device);
                    }
                }
                let piece = streamer.push(g.id);
                if piece.is_empty() && self.tokenizer.decode_with(&[g.id], true).is_empty() {
                    report.special += 1;
                }
                let (print, stop) = stopper.push(g.id, streamer.text());
                if json {
                    tokens.push(TokenOut {
                        id: g.id,
                        text: piece,
                        logprob: g.logprob,
                    });
                } else if let Err(e) = write!(out, "{print}").and_then(|_| out.flush()) {
                    write_error = Some(e);
                    return false;
                }
                !stop
            })?;
        if let Some(e) = write_error {
            return Err(e).context("writing to stdout");
        }
        if let Some(m) = memory.as_mut() {
            m.sample(device);
        }
        report.memory = memory;
        report.tokens += new.len();
        let reason = stopper
            .reason
            .clone()
            .unwrap_or(if new.len() >= self.max_new {
                StopReason::Length
            } else {
                StopReason::Context
            });
        let text = match &reason {
            StopReason::Stop(_) => stopper.emitted.clone(),
            _ => streamer.text().to_string(),
        };
        if json {
            let line = PromptOut {
                prompt,
                text,
                tokens,
                stop: reason.clone(),
                prompt_tokens: ids.len(),
                seed,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        } else {
            let rest = stopper.rest(&text);
            writeln!(out, "{rest}")?;
        }
        out.flush()?;
        eprintln!("stopped: {reason} after {} tokens", new.len());
        report.stops.push(reason);
        Ok(())
    }
}

impl OnBackend for GenerateJob {
    type Output = Result<GenerateReport>;

    fn run<B: Backend>(self, device: B::Device, choice: &BackendChoice) -> Result<GenerateReport> {
        let model = model::<B>(
            &self.config,
            Some(self.weights.clone()),
            self.options,
            &device,
        )?;
        let mut report = GenerateReport {
            memory: self.stats.then(MemoryStats::default),
            ..Default::default()
        };
        // measured with the model loaded: its weights count as used
        let place = (free_memory(choice), choice);
        let t0 = Instant::now();
        match &self.prompts {
            Prompts::Given(prompts) => {
                for (i, prompt) in prompts.iter().enumerate() {
                    if prompts.len() > 1 && !self.json {
                        println!("### {}", i + 1);
                    }
                    self.one(
                        &model,
                        &device,
                        place,
                        &prompt.text,
                        self.seed.wrapping_add(i as u64),
                        &mut report,
                    )
                    .with_context(|| prompt.origin.clone())?;
                }
            }
            Prompts::Interactive => {
                let stdin = std::io::stdin();
                let terminal = stdin.is_terminal();
                if terminal {
                    eprintln!("interactive: one prompt per line; Ctrl-D ends");
                }
                let mut turn = 0u64;
                loop {
                    if terminal {
                        eprint!("> ");
                        std::io::stderr().flush()?;
                    }
                    let mut line = String::new();
                    if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
                        break;
                    }
                    let prompt = line.trim_end_matches(['\n', '\r']);
                    if prompt.trim().is_empty() {
                        continue;
                    }
                    // a prompt that does not fit is said and skipped, the session goes on
                    let fits =
                        prompt_ids(&self.tokenizer, prompt, self.raw_prompt).and_then(|ids| {
                            let room = generation_room(&self.config, ids.len())?;
                            let new = self.max_new.min(room);
                            check_cache_fits::<B>(&self.config, ids.len(), new, place.0, choice)
                        });
                    if let Err(e) = fits {
                        eprintln!("error: {e}");
                        continue;
                    }
                    let seed = self.seed.wrapping_add(turn);
                    self.one(&model, &device, place, prompt, seed, &mut report)?;
                    turn += 1;
                }
            }
        }
        report.generate_s = t0.elapsed().as_secs_f64();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &Stops, pieces: &[(u32, &str)]) -> (String, Option<StopReason>) {
        let mut s = Stopper::new(stops);
        let mut text = String::new();
        let mut printed = String::new();
        for &(id, piece) in pieces {
            text.push_str(piece);
            let (out, stop) = s.push(id, &text);
            printed.push_str(&out);
            if stop {
                return (printed, s.reason);
            }
        }
        printed.push_str(&s.rest(&text));
        (printed, s.reason)
    }

    #[test]
    fn an_incomplete_character_is_held_back_not_sliced() {
        // a byte-level tokenizer's decoding: "é" (2 bytes) shows as U+FFFD until complete
        let stops = Stops::default();
        let mut s = Stopper::new(&stops);
        let mut printed = String::new();
        for text in ["a", "a\u{FFFD}", "aé", "aé\u{FFFD}", "aé😀"] {
            let (out, stop) = s.push(9, text);
            assert!(!stop);
            printed.push_str(&out);
        }
        assert_eq!(printed, "aé😀");
    }

    #[test]
    fn stop_strings_cut_the_continuation_even_across_tokens() {
        let stops = Stops {
            eos: Some(3),
            strings: vec!["。\n".into(), "END".into()],
        };
        // "EN" is held back until "D" completes the stop string
        let (out, why) = run(&stops, &[(5, "ab"), (6, "cE"), (7, "N"), (8, "Dx")]);
        assert_eq!(out, "abc");
        assert_eq!(why, Some(StopReason::Stop("END".into())));
        // a held-back prefix that does not complete is printed later
        let (out, why) = run(&stops, &[(5, "E"), (6, "Nx"), (7, "y")]);
        assert_eq!(out, "ENxy");
        assert_eq!(why, None);
        // the end-of-document token
        let (out, why) = run(&stops, &[(5, "好"), (3, ""), (7, "x")]);
        assert_eq!(out, "好");
        assert_eq!(why, Some(StopReason::Eos));
        // multi-byte stop strings
        let (out, _) = run(&stops, &[(5, "床前。"), (6, "\n明月")]);
        assert_eq!(out, "床前");
    }
}
