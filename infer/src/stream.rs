//! Printing tokens as they are produced. WordPiece pieces (`##x`) and the spacing rules between
//! CJK and Latin text only make sense in context, so the whole continuation is decoded again and
//! only the new suffix is returned.

use nsa_runtime::tokenizer::Tokenizer;

/// Turns a growing list of token ids into the text to print next.
pub struct Streamer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: String,
}

impl<'a> Streamer<'a> {
    /// An empty stream.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            printed: String::new(),
        }
    }

    /// Adds a token; returns the text that extends what was printed so far.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tokenizer.decode_with(&self.ids, true);
        let common = common_prefix(&self.printed, &text);
        let new = text[common..].to_string();
        // text before `common` that changed after printing cannot be taken back; keep going
        self.printed = text;
        new
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.printed
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for (x, y) in a.char_indices().zip(b.chars()) {
        if x.1 != y {
            break;
        }
        n = x.0 + x.1.len_utf8();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_decoding_at_once() {
        let tok = nsa_runtime::tokenizer::bert_base_chinese();
        let ids = tok.encode("床前明月光，hello world 2024年").unwrap();
        let mut s = Streamer::new(&tok);
        let streamed: String = ids.iter().map(|&id| s.push(id)).collect();
        assert_eq!(streamed, tok.decode_with(&ids, true));
    }
}
