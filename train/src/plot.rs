//! The loss curve of a run as a PNG (`<run>/loss.png`): training loss per step (raw, light,
//! and an exponential moving average), validation loss at every evaluation and, dashed, the
//! unigram entropy of the training split, against the optimizer step. Drawn on a pixel buffer
//! with a built-in 5×7 font and encoded with the pure-Rust `png` crate.

use std::path::Path;

use crate::metrics::CsvRow;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const AXIS: Rgb = [60, 60, 60];
const GRID: Rgb = [228, 228, 228];
const TEXT: Rgb = [40, 40, 40];
const TRAIN_RAW: Rgb = [178, 205, 235];
const TRAIN: Rgb = [31, 94, 180];
const VALID: Rgb = [230, 110, 20];
const ENTROPY: Rgb = [120, 120, 120];

/// A 5×7 glyph: 7 rows, the 5 low bits of each row, most significant bit = leftmost pixel.
fn glyph(c: char) -> Option<[u8; 7]> {
    let rows: [&str; 7] = match c.to_ascii_lowercase() {
        '0' => [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => [
            "#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###.",
        ],
        '4' => [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => [
            "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => [
            ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
        ],
        'a' => [
            ".....", ".....", ".###.", "....#", ".####", "#...#", ".####",
        ],
        'b' => [
            "#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####.",
        ],
        'c' => [
            ".....", ".....", ".###.", "#....", "#....", "#...#", ".###.",
        ],
        'd' => [
            "....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####",
        ],
        'e' => [
            ".....", ".....", ".###.", "#...#", "#####", "#....", ".###.",
        ],
        'f' => [
            "..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#...",
        ],
        'g' => [
            ".....", ".####", "#...#", "#...#", ".####", "....#", ".###.",
        ],
        'h' => [
            "#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#",
        ],
        'i' => [
            "..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###.",
        ],
        'j' => [
            "...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'k' => [
            "#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#.",
        ],
        'l' => [
            ".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'm' => [
            ".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#",
        ],
        'n' => [
            ".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#",
        ],
        'o' => [
            ".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.",
        ],
        'p' => [
            ".....", ".....", "####.", "#...#", "####.", "#....", "#....",
        ],
        'q' => [
            ".....", ".....", ".##.#", "#..##", ".####", "....#", "....#",
        ],
        'r' => [
            ".....", ".....", "#.##.", "##..#", "#....", "#....", "#....",
        ],
        's' => [
            ".....", ".....", ".###.", "#....", ".###.", "....#", "####.",
        ],
        't' => [
            ".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##.",
        ],
        'u' => [
            ".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#",
        ],
        'v' => [
            ".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'w' => [
            ".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'x' => [
            ".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#",
        ],
        'y' => [
            ".....", ".....", "#...#", "#...#", ".####", "....#", ".###.",
        ],
        'z' => [
            ".....", ".....", "#####", "...#.", "..#..", ".#...", "#####",
        ],
        '.' => [
            ".....", ".....", ".....", ".....", ".....", ".##..", ".##..",
        ],
        ',' => [
            ".....", ".....", ".....", ".....", ".##..", "..#..", ".#...",
        ],
        '-' => [
            ".....", ".....", ".....", "#####", ".....", ".....", ".....",
        ],
        '+' => [
            ".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....",
        ],
        '(' => [
            "...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.",
        ],
        ')' => [
            ".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...",
        ],
        ':' => [
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....",
        ],
        '/' => [
            ".....", "....#", "...#.", "..#..", ".#...", "#....", ".....",
        ],
        '=' => [
            ".....", ".....", "#####", ".....", "#####", ".....", ".....",
        ],
        _ => return None,
    };
    let mut bits = [0u8; 7];
    for (b, row) in bits.iter_mut().zip(rows) {
        for (i, ch) in row.bytes().enumerate() {
            if ch == b'#' {
                *b |= 1 << (4 - i);
            }
        }
    }
    Some(bits)
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: WHITE.repeat(w * h),
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line of width `width` (Bresenham with square pens); `dash` = (on, off) pixels.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: Rgb, width: i64, dash: Option<(i64, i64)>) {
        let (mut x0, mut y0) = (a.0.round() as i64, a.1.round() as i64);
        let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        let r = (width - 1) / 2;
        let mut n = 0i64;
        loop {
            let on = dash.is_none_or(|(a, b)| n % (a + b) < a);
            if on {
                self.rect(x0 - r, y0 - r, x0 - r + width - 1, y0 - r + width - 1, c);
            }
            n += 1;
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Text at (x, y) = top-left, scaled `s`; returns the width drawn.
    fn text(&mut self, x: i64, y: i64, s: i64, text: &str, c: Rgb) -> i64 {
        let mut cx = x;
        for ch in text.chars() {
            if let Some(g) = glyph(ch) {
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..5 {
                        if bits & (1 << (4 - col)) != 0 {
                            let px = cx + col * s;
                            let py = y + row as i64 * s;
                            self.rect(px, py, px + s - 1, py + s - 1, c);
                        }
                    }
                }
            }
            cx += 6 * s;
        }
        cx - x
    }

    fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&self.px)?;
        }
        Ok(out)
    }
}

fn text_width(text: &str, s: i64) -> i64 {
    text.chars().count() as i64 * 6 * s
}

/// Round tick positions covering `[lo, hi]` (steps of 1, 2 or 5 × 10^k).
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 && v.abs() < 1e15 {
        format!("{}", v.round() as i64)
    } else {
        let decimals = (-step.log10().floor()).max(0.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// Series of the plot, from the rows of `metrics.csv`.
pub struct LossSeries {
    /// Training loss per step (non-finite steps left out).
    pub train: Vec<(f64, f64)>,
    /// Validation loss per evaluation.
    pub valid: Vec<(f64, f64)>,
}

impl LossSeries {
    /// Extracts the series from CSV rows.
    pub fn from_rows(rows: &[CsvRow]) -> Self {
        let pick = |split: &str| {
            rows.iter()
                .filter(|r| r.split == split && r.loss.is_finite())
                .map(|r| (r.step as f64, r.loss))
                .collect()
        };
        Self {
            train: pick("train"),
            valid: pick("valid"),
        }
    }
}

/// Renders the loss curve as PNG bytes (`entropy`: the dashed reference line, if any).
pub fn render(series: &LossSeries, entropy: Option<f64>, title: &str) -> Vec<u8> {
    let (w, h) = (960usize, 560usize);
    let mut c = Canvas::new(w, h);
    let (left, right, top, bottom) = (86i64, 24i64, 48i64, 64i64);
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);

    // exponential moving average of the training loss
    let alpha = 2.0 / (1.0 + (series.train.len() as f64 / 20.0).clamp(1.0, 50.0));
    let mut ema = Vec::with_capacity(series.train.len());
    let mut acc = None;
    for &(x, y) in &series.train {
        let v = match acc {
            None => y,
            Some(a) => a + alpha * (y - a),
        };
        acc = Some(v);
        ema.push((x, v));
    }

    let all_y = series
        .train
        .iter()
        .chain(&series.valid)
        .map(|p| p.1)
        .chain(entropy);
    let (mut ylo, mut yhi) = all_y.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if !ylo.is_finite() {
        (ylo, yhi) = (0.0, 1.0);
    }
    let pad = ((yhi - ylo) * 0.05).max(0.05);
    ylo = (ylo - pad).max(0.0);
    yhi += pad;
    let xhi = series
        .train
        .iter()
        .chain(&series.valid)
        .map(|p| p.0)
        .fold(1.0f64, f64::max);
    let (xlo, xhi) = (0.0, xhi);

    let px = |x: f64| left as f64 + (x - xlo) / (xhi - xlo) * pw as f64;
    let py = |y: f64| top as f64 + (yhi - y) / (yhi - ylo) * ph as f64;

    // grid and tick labels
    let yt = ticks(ylo, yhi, 8);
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for &t in &yt {
        let y = py(t);
        c.line((left as f64, y), ((left + pw) as f64, y), GRID, 1, None);
        let label = tick_label(t, ystep);
        let tw = text_width(&label, 2);
        c.text(left - 10 - tw, y.round() as i64 - 7, 2, &label, TEXT);
    }
    let xt = ticks(xlo, xhi, 8);
    let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
    for &t in &xt {
        let x = px(t);
        c.line((x, top as f64), (x, (top + ph) as f64), GRID, 1, None);
        let label = tick_label(t, xstep);
        let tw = text_width(&label, 2);
        c.text(x.round() as i64 - tw / 2, top + ph + 10, 2, &label, TEXT);
    }
    // axes
    c.line(
        (left as f64, (top + ph) as f64),
        ((left + pw) as f64, (top + ph) as f64),
        AXIS,
        2,
        None,
    );
    c.line(
        (left as f64, top as f64),
        (left as f64, (top + ph) as f64),
        AXIS,
        2,
        None,
    );
    let xl = "optimizer step";
    c.text(
        left + pw / 2 - text_width(xl, 2) / 2,
        h as i64 - 26,
        2,
        xl,
        TEXT,
    );
    c.text(left, 14, 2, title, TEXT);

    // curves
    if let Some(e) = entropy {
        c.line(
            (px(xlo), py(e)),
            (px(xhi), py(e)),
            ENTROPY,
            2,
            Some((10, 7)),
        );
    }
    for pair in series.train.windows(2) {
        c.line(
            (px(pair[0].0), py(pair[0].1)),
            (px(pair[1].0), py(pair[1].1)),
            TRAIN_RAW,
            1,
            None,
        );
    }
    for pair in ema.windows(2) {
        c.line(
            (px(pair[0].0), py(pair[0].1)),
            (px(pair[1].0), py(pair[1].1)),
            TRAIN,
            3,
            None,
        );
    }
    for pair in series.valid.windows(2) {
        c.line(
            (px(pair[0].0), py(pair[0].1)),
            (px(pair[1].0), py(pair[1].1)),
            VALID,
            3,
            None,
        );
    }
    for &(x, y) in &series.valid {
        let (x, y) = (px(x).round() as i64, py(y).round() as i64);
        c.rect(x - 4, y - 4, x + 4, y + 4, VALID);
    }

    // legend (top right)
    let mut items = vec![("train (ema)", TRAIN, None), ("validation", VALID, None)];
    if entropy.is_some() {
        items.push(("unigram entropy", ENTROPY, Some((6, 4))));
    }
    let lw = items.iter().map(|i| text_width(i.0, 2)).max().unwrap_or(0) + 56;
    let lx = left + pw - lw - 8;
    let mut ly = top + 12;
    c.rect(
        lx - 8,
        ly - 8,
        lx + lw,
        ly + items.len() as i64 * 26 - 4,
        WHITE,
    );
    for (label, color, dash) in items {
        c.line(
            (lx as f64, (ly + 7) as f64),
            ((lx + 36) as f64, (ly + 7) as f64),
            color,
            3,
            dash,
        );
        c.text(lx + 46, ly, 2, label, TEXT);
        ly += 26;
    }

    c.png().expect("PNG encoding of a pixel buffer cannot fail")
}

/// Writes the loss curve of `rows` to `path` (atomically).
pub fn write_loss_png(
    path: &Path,
    rows: &[CsvRow],
    entropy: Option<f64>,
    title: &str,
) -> std::io::Result<()> {
    let bytes = render(&LossSeries::from_rows(rows), entropy, title);
    nsa_runtime::bundle::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            ticks(0.0, 400.0, 8),
            [0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0]
        );
        let t = ticks(4.3, 10.2, 8);
        assert_eq!(t.first(), Some(&5.0));
        assert_eq!(t.last(), Some(&10.0));
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(250.0, 50.0), "250");
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        for ch in "0123456789abcdefghijklmnopqrstuvwxyz.,-+():/= ".chars() {
            assert!(ch == ' ' || glyph(ch).is_some(), "{ch}");
        }
    }

    #[test]
    fn renders_a_png() {
        let rows: Vec<CsvRow> = (1..=50)
            .flat_map(|s| {
                let mut v = vec![CsvRow {
                    step: s,
                    split: "train".into(),
                    loss: 10.0 / (1.0 + s as f64 / 10.0),
                    lr: Some(1e-3),
                    grad_norm: Some(1.0),
                    tokens_per_s: Some(100.0),
                    tokens_seen: s * 10,
                    elapsed_s: s as f64,
                    non_finite: false,
                    indexer_loss: None,
                }];
                if s % 10 == 0 {
                    v.push(CsvRow {
                        split: "valid".into(),
                        loss: 11.0 / (1.0 + s as f64 / 10.0),
                        ..v[0].clone()
                    });
                }
                v
            })
            .collect();
        let bytes = render(&LossSeries::from_rows(&rows), Some(6.5), "loss (nats)");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (960, 560));
    }
}
