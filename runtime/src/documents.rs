//! Reading text documents from corpus files: what training tokenises and what `nsa-infer score`
//! measures.
//!
//! A path is a file or a directory. A directory is walked recursively in sorted
//! path order; hidden entries (names starting with `.`) are skipped and only files with a
//! known extension are read: `.txt`, `.text`, `.jsonl`, `.json`, `.xml`, each optionally
//! followed by `.gz` (see [`corpus_files`]). A file is read as follows:
//!
//! * **gzip** is recognised by its magic bytes `1f 8b`, whatever the name; a file whose name
//!   ends in `.gz` but that is not gzip data is an error. The rules below then apply to the
//!   decompressed data and to the name without `.gz`.
//! * **Wikipedia abstract dump** (`zhwiki-latest-abstract.xml[.gz]`) is recognised by its
//!   content: it starts with `<` (after an optional byte order mark and whitespace) and has
//!   `<feed` within its first 4 KiB. Each
//!   `<doc><title>Wikipedia: X</title><url>…</url><abstract>TEXT</abstract><links>…</links></doc>`
//!   gives one document: the abstract text alone (it normally starts with the subject's
//!   name, so the title is not repeated), with XML entities unescaped and surrounding
//!   whitespace trimmed. Empty abstracts and table/template residue (abstracts starting with
//!   `|`, `{`, `}` or `!`) are skipped.
//! * **JSON lines** (`.jsonl`, or `.json`): one JSON object per non-blank line; the document is
//!   its `"text"` string field, else `"abstract"`, else `"content"`; an object with none of
//!   them is an error naming the file and line. A `.json` file whose first non-blank
//!   character is `[` is read as one JSON array of such objects. Empty strings are skipped.
//! * **plain text** (anything else): one document per line, lines trimmed, blank lines
//!   skipped. A UTF-8 byte order mark is ignored.
//!
//! Text must be UTF-8: invalid bytes are an error naming the file and the byte offset (in
//! the decompressed data for gzip files); nothing is replaced silently. A corpus with no
//! document at all is an error.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Extensions read from directories (each may be followed by `.gz`).
pub const KNOWN_EXTENSIONS: [&str; 5] = ["txt", "text", "jsonl", "json", "xml"];

/// How many leading bytes are inspected to recognise the XML dump.
const SNIFF_LEN: usize = 4096;

/// Errors of document reading. Every error names the file.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: the name ends in .gz but the file is not gzip data (no 1f 8b magic bytes)")]
    NotGzip { path: PathBuf },
    #[error("{path}: invalid UTF-8 at byte offset {offset}{}", if *.decompressed { " of the decompressed data" } else { "" })]
    InvalidUtf8 {
        path: PathBuf,
        offset: u64,
        decompressed: bool,
    },
    #[error("{path}: {location}: invalid JSON: {message}")]
    Json {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("{path}: {location}: no string field \"text\", \"abstract\" or \"content\"")]
    MissingText { path: PathBuf, location: String },
    #[error("{path}: no documents")]
    Empty { path: PathBuf },
    #[error(
        "{path}: no text files in this directory{}; text files are .txt, .text, .jsonl, .json \
         and Wikipedia abstract .xml, each optionally .gz (subdirectories are searched too)",
        if *.skipped > 0 { format!(" ({skipped} file(s) with other extensions skipped)") } else { String::new() }
    )]
    NoTextFiles { path: PathBuf, skipped: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DocumentError + '_ {
    move |source| DocumentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads all documents of a file or directory (formats in the module docs).
pub fn read_documents(path: impl AsRef<Path>) -> Result<Vec<String>, DocumentError> {
    let path = path.as_ref();
    let mut docs = Vec::new();
    append_documents(path, &mut docs)?;
    if docs.is_empty() {
        return Err(DocumentError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(docs)
}

/// Appends the documents of every file of `path` (see [`corpus_files`]) to `docs`; unlike
/// [`read_documents`], finding none is not an error.
pub fn append_documents(path: &Path, docs: &mut Vec<String>) -> Result<(), DocumentError> {
    for file in corpus_files(path)? {
        let reader = File::open(&file).map_err(io_err(&file))?;
        read_into(reader, &file, docs)?;
    }
    Ok(())
}

/// Reads the documents of one file's contents; `name` gives the format hints (extension)
/// and is used in error messages.
pub fn read_documents_from(
    reader: impl Read,
    name: impl AsRef<Path>,
) -> Result<Vec<String>, DocumentError> {
    let name = name.as_ref();
    let mut docs = Vec::new();
    read_into(reader, name, &mut docs)?;
    if docs.is_empty() {
        return Err(DocumentError::Empty {
            path: name.to_path_buf(),
        });
    }
    Ok(docs)
}

/// The files [`read_documents`] reads for `path`: the path itself if it is a file, else the
/// files with a known extension under it, recursively, sorted, hidden entries skipped (a
/// directory without any is an error that lists the extensions).
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>, DocumentError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut skipped = 0;
    walk(path, &mut files, &mut skipped)?;
    if files.is_empty() {
        return Err(DocumentError::NoTextFiles {
            path: path.to_path_buf(),
            skipped,
        });
    }
    files.sort();
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut usize) -> Result<(), DocumentError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // follow symlinks
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            walk(&path, files, skipped)?;
        } else if has_known_extension(&path) {
            files.push(path);
        } else {
            *skipped += 1;
        }
    }
    Ok(())
}

fn has_known_extension(path: &Path) -> bool {
    let base = strip_gz(path);
    base.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| KNOWN_EXTENSIONS.iter().any(|k| e.eq_ignore_ascii_case(k)))
}

fn is_gz_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// `a/b.txt.gz` -> `a/b.txt`; other names unchanged.
fn strip_gz(path: &Path) -> PathBuf {
    if is_gz_name(path) {
        path.with_extension("")
    } else {
        path.to_path_buf()
    }
}

/// Reads up to `n` bytes (fewer only at end of input).
fn read_head(reader: &mut impl Read, n: usize, path: &Path) -> Result<Vec<u8>, DocumentError> {
    let mut head = Vec::with_capacity(n);
    reader
        .take(n as u64)
        .read_to_end(&mut head)
        .map_err(io_err(path))?;
    Ok(head)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
    JsonArray,
    WikiXml,
}

fn read_into(mut raw: impl Read, path: &Path, docs: &mut Vec<String>) -> Result<(), DocumentError> {
    let magic = read_head(&mut raw, 2, path)?;
    let gzip = magic == [0x1f, 0x8b];
    if is_gz_name(path) && !gzip {
        return Err(DocumentError::NotGzip {
            path: path.to_path_buf(),
        });
    }
    let raw = Cursor::new(magic).chain(raw);
    let mut data: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    let head = read_head(&mut data, SNIFF_LEN, path)?;
    let inner_name = strip_gz(path);
    let ext = inner_name
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let first = head
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(&head)
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
        .unwrap_or(b' ');
    let format = if first == b'<' && head.windows(5).any(|w| w == b"<feed") {
        Format::WikiXml
    } else if ext.as_deref() == Some("json") && first == b'[' {
        Format::JsonArray
    } else if matches!(ext.as_deref(), Some("jsonl" | "json")) {
        Format::JsonLines
    } else {
        Format::Text
    };
    let reader = BufReader::with_capacity(1 << 20, Cursor::new(head).chain(data));
    let mut lines = Lines::new(reader, path, gzip);
    match format {
        Format::Text => {
            while let Some((_, line)) = lines.next_line()? {
                let doc = line.trim();
                if !doc.is_empty() {
                    docs.push(doc.to_string());
                }
            }
        }
        Format::JsonLines => {
            while let Some((n, line)) = lines.next_line()? {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let location = format!("line {n}");
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| DocumentError::Json {
                        path: path.to_path_buf(),
                        location: location.clone(),
                        message: e.to_string(),
                    })?;
                push_json_text(&value, path, location, docs)?;
            }
        }
        Format::JsonArray => {
            let mut text = String::new();
            while let Some((_, line)) = lines.next_line()? {
                text.push_str(line);
                text.push('\n');
            }
            let value: Vec<serde_json::Value> =
                serde_json::from_str(&text).map_err(|e| DocumentError::Json {
                    path: path.to_path_buf(),
                    location: format!("line {}", e.line()),
                    message: e.to_string(),
                })?;
            for (i, v) in value.iter().enumerate() {
                push_json_text(v, path, format!("array element {i}"), docs)?;
            }
        }
        Format::WikiXml => read_wiki_abstracts(&mut lines, docs)?,
    }
    Ok(())
}

fn push_json_text(
    value: &serde_json::Value,
    path: &Path,
    location: String,
    docs: &mut Vec<String>,
) -> Result<(), DocumentError> {
    let text = ["text", "abstract", "content"]
        .iter()
        .find_map(|k| value.get(k).and_then(|v| v.as_str()))
        .ok_or_else(|| DocumentError::MissingText {
            path: path.to_path_buf(),
            location,
        })?;
    let text = text.trim();
    if !text.is_empty() {
        docs.push(text.to_string());
    }
    Ok(())
}

/// Line reader that validates UTF-8 and tracks byte offsets for error messages.
struct Lines<'p, R> {
    reader: R,
    path: &'p Path,
    decompressed: bool,
    buf: Vec<u8>,
    offset: u64,
    line_no: usize,
}

impl<'p, R: BufRead> Lines<'p, R> {
    fn new(reader: R, path: &'p Path, decompressed: bool) -> Self {
        Self {
            reader,
            path,
            decompressed,
            buf: Vec::new(),
            offset: 0,
            line_no: 0,
        }
    }

    /// The next line (1-based number, text without `\n` / `\r\n`), or `None` at the end.
    fn next_line(&mut self) -> Result<Option<(usize, &str)>, DocumentError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(io_err(self.path))?;
        if n == 0 {
            return Ok(None);
        }
        let start = self.offset;
        self.offset += n as u64;
        self.line_no += 1;
        let mut bytes = &self.buf[..];
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b.strip_suffix(b"\r").unwrap_or(b);
        }
        let mut skip = 0;
        if self.line_no == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
            skip = 3;
        }
        match std::str::from_utf8(&bytes[skip..]) {
            Ok(s) => Ok(Some((self.line_no, s))),
            Err(e) => Err(DocumentError::InvalidUtf8 {
                path: self.path.to_path_buf(),
                offset: start + (skip + e.valid_up_to()) as u64,
                decompressed: self.decompressed,
            }),
        }
    }
}

/// Streams `<doc>` elements of a Wikipedia abstract dump and keeps their abstracts.
fn read_wiki_abstracts<R: BufRead>(
    lines: &mut Lines<'_, R>,
    docs: &mut Vec<String>,
) -> Result<(), DocumentError> {
    let mut pending = String::new();
    while let Some((_, line)) = lines.next_line()? {
        pending.push_str(line);
        pending.push('\n');
        while let Some(end) = pending.find("</doc>") {
            if let Some(text) = wiki_abstract(&pending[..end]) {
                docs.push(text);
            }
            pending.drain(..end + "</doc>".len());
        }
    }
    Ok(())
}

/// The kept abstract of one `<doc>` element (without `</doc>`), if any.
fn wiki_abstract(doc: &str) -> Option<String> {
    let open = doc.find("<abstract")?;
    let rest = &doc[open + "<abstract".len()..];
    let gt = rest.find('>')?;
    if rest[..gt].ends_with('/') {
        return None; // <abstract/> or <abstract />
    }
    let body = &rest[gt + 1..];
    let body = &body[..body.find("</abstract>")?];
    let text = unescape_xml(body);
    let text = text.trim();
    if text.is_empty() || text.starts_with(['|', '{', '}', '!']) {
        return None;
    }
    Some(text.to_string())
}

/// Replaces the five predefined XML entities and numeric character references; anything
/// else is left as it is.
pub fn unescape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let decoded = tail.find(';').filter(|&semi| semi <= 12).and_then(|semi| {
            let name = &tail[1..semi];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const WIKI: &str = r#"<feed>
<doc>
<title>Wikipedia: 数学</title>
<url>https://zh.wikipedia.org/wiki/%E6%95%B0%E5%AD%A6</url>
<abstract>数学是研究数量、结构以及空间等概念的一门学科 &amp; 更多&#x3002;</abstract>
<links>
<sublink linktype="nav"><anchor>历史</anchor><link>https://zh.wikipedia.org/wiki/x</link></sublink>
</links>
</doc>
<doc>
<title>Wikipedia: 空</title>
<url>https://zh.wikipedia.org/wiki/y</url>
<abstract />
<links></links>
</doc>
<doc>
<title>Wikipedia: 表格</title>
<url>https://zh.wikipedia.org/wiki/z</url>
<abstract>| 名称 = 表格 |</abstract>
<links></links>
</doc>
<doc><title>Wikipedia: 模板</title><url>u</url><abstract>{{Infobox}}</abstract><links></links></doc>
<doc><title>Wikipedia: 北京</title><url>u</url><abstract>北京是&lt;中国&gt;的首都。</abstract><links></links></doc>
</feed>
"#;

    #[test]
    fn plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        fs::write(&p, "\u{feff}第一行\n\n  第二行  \r\n\n第三行").unwrap();
        assert_eq!(read_documents(&p).unwrap(), ["第一行", "第二行", "第三行"]);
        // "<feed" inside ordinary text does not make it XML
        let q = dir.path().join("b.txt");
        fs::write(&q, "RSS 用 <feed> 标签\n").unwrap();
        assert_eq!(read_documents(&q).unwrap(), ["RSS 用 <feed> 标签"]);
    }

    #[test]
    fn directory_sorted_recursive_known_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        fs::create_dir_all(d.join(".hidden")).unwrap();
        fs::write(d.join("b.txt"), "乙\n").unwrap();
        fs::write(d.join("a.txt"), "甲\n").unwrap();
        fs::write(d.join("sub/c.jsonl"), "{\"text\": \"丙\"}\n").unwrap();
        fs::write(d.join("sub/deeper/d.txt.gz"), gz("丁\n".as_bytes())).unwrap();
        fs::write(d.join("sub/e.xml"), WIKI).unwrap();
        fs::write(d.join("ignored.bin"), [0xff, 0xfe]).unwrap();
        fs::write(d.join(".hidden/x.txt"), "隐\n").unwrap();
        fs::write(d.join(".y.txt"), "隐\n").unwrap();
        let docs = read_documents(d).unwrap();
        assert_eq!(
            docs,
            [
                "甲",
                "乙",
                "丙",
                "丁",
                "数学是研究数量、结构以及空间等概念的一门学科 & 更多。",
                "北京是<中国>的首都。"
            ]
        );
    }

    #[test]
    fn gzip_by_magic_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.txt.gz");
        fs::write(&p, gz("春眠不觉晓\n处处闻啼鸟\n".as_bytes())).unwrap();
        assert_eq!(read_documents(&p).unwrap(), ["春眠不觉晓", "处处闻啼鸟"]);
        // gzip data under a plain name is still recognised by its magic bytes
        let q = dir.path().join("y.txt");
        fs::write(&q, gz("夜来风雨声\n".as_bytes())).unwrap();
        assert_eq!(read_documents(&q).unwrap(), ["夜来风雨声"]);
        // multi-member gzip (cat a.gz b.gz)
        let mut two = gz("一\n".as_bytes());
        two.extend(gz("二\n".as_bytes()));
        let r = dir.path().join("two.gz");
        fs::write(&r, two).unwrap();
        assert_eq!(read_documents(&r).unwrap(), ["一", "二"]);
    }

    #[test]
    fn not_gzip_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fake.txt.gz");
        fs::write(&p, "plain text\n").unwrap();
        let err = read_documents(&p).unwrap_err();
        assert!(matches!(err, DocumentError::NotGzip { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("fake.txt.gz") && msg.contains("not gzip"),
            "{msg}"
        );
    }

    #[test]
    fn json_lines_and_array() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        fs::write(
            &p,
            "{\"text\": \"正文\", \"abstract\": \"摘要\"}\n\n{\"abstract\": \"只有摘要\"}\n\
             {\"content\": \"内容\", \"text\": 3}\n{\"text\": \"\"}\n",
        )
        .unwrap();
        assert_eq!(read_documents(&p).unwrap(), ["正文", "只有摘要", "内容"]);
        let q = dir.path().join("b.json");
        fs::write(&q, "[{\"text\": \"一\"}, {\"content\": \"二\"}]").unwrap();
        assert_eq!(read_documents(&q).unwrap(), ["一", "二"]);
        let gzq = dir.path().join("c.jsonl.gz");
        fs::write(&gzq, gz("{\"text\": \"压缩\"}\n".as_bytes())).unwrap();
        assert_eq!(read_documents(&gzq).unwrap(), ["压缩"]);
    }

    #[test]
    fn json_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl");
        fs::write(&p, "{\"text\": \"好\"}\n{\"title\": \"无正文\"}\n").unwrap();
        let msg = read_documents(&p).unwrap_err().to_string();
        assert!(msg.contains("bad.jsonl") && msg.contains("line 2"), "{msg}");
        fs::write(&p, "{\"text\": \"好\"}\n{oops\n").unwrap();
        let msg = read_documents(&p).unwrap_err().to_string();
        assert!(
            msg.contains("bad.jsonl") && msg.contains("line 2") && msg.contains("invalid JSON"),
            "{msg}"
        );
    }

    #[test]
    fn wiki_xml_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let expected = [
            "数学是研究数量、结构以及空间等概念的一门学科 & 更多。",
            "北京是<中国>的首都。",
        ];
        // recognised by content, whatever the name
        let p = dir.path().join("zhwiki-latest-abstract.xml");
        fs::write(&p, WIKI).unwrap();
        assert_eq!(read_documents(&p).unwrap(), expected);
        let q = dir.path().join("dump.txt");
        fs::write(&q, format!("<?xml version=\"1.0\"?>\n{WIKI}")).unwrap();
        assert_eq!(read_documents(&q).unwrap(), expected);
        let r = dir.path().join("zhwiki-latest-abstract.xml.gz");
        fs::write(&r, gz(WIKI.as_bytes())).unwrap();
        assert_eq!(read_documents(&r).unwrap(), expected);
    }

    #[test]
    fn xml_unescaping() {
        assert_eq!(
            unescape_xml("a &amp;lt; b &#65;&#x4E2D; &bogus; & end&"),
            "a &lt; b A中 &bogus; & end&"
        );
    }

    #[test]
    fn invalid_utf8_error_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latin1.txt");
        let mut data = "好的\n".as_bytes().to_vec(); // 7 bytes
        data.extend_from_slice(b"caf\xe9\n");
        fs::write(&p, &data).unwrap();
        let err = read_documents(&p).unwrap_err();
        match &err {
            DocumentError::InvalidUtf8 {
                offset,
                decompressed,
                ..
            } => {
                assert_eq!(*offset, 10);
                assert!(!decompressed);
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("latin1.txt") && msg.contains("byte offset 10"),
            "{msg}"
        );
        // same inside gzip, in XML and in JSON lines
        let g = dir.path().join("latin1.txt.gz");
        fs::write(&g, gz(&data)).unwrap();
        let msg = read_documents(&g).unwrap_err().to_string();
        assert!(
            msg.contains("byte offset 10 of the decompressed data"),
            "{msg}"
        );
        let x = dir.path().join("bad.xml");
        let mut xml = b"<feed>\n<doc><abstract>".to_vec();
        xml.extend_from_slice(b"\xff</abstract></doc></feed>\n");
        fs::write(&x, &xml).unwrap();
        let msg = read_documents(&x).unwrap_err().to_string();
        assert!(
            msg.contains("bad.xml") && msg.contains("byte offset 22"),
            "{msg}"
        );
        let j = dir.path().join("bad.jsonl");
        fs::write(&j, b"{\"text\": \"\xc3\"}\n").unwrap();
        let msg = read_documents(&j).unwrap_err().to_string();
        assert!(
            msg.contains("bad.jsonl") && msg.contains("byte offset 10"),
            "{msg}"
        );
    }

    #[test]
    fn empty_corpus_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.txt");
        fs::write(&p, "\n   \n\n").unwrap();
        let msg = read_documents(&p).unwrap_err().to_string();
        assert!(
            msg.contains("empty.txt") && msg.contains("no documents"),
            "{msg}"
        );
        let d = dir.path().join("emptydir");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("notes.bin"), "x").unwrap();
        let msg = read_documents(&d).unwrap_err().to_string();
        assert!(
            msg.contains("emptydir") && msg.contains(".jsonl") && msg.contains("1 file(s)"),
            "{msg}"
        );
        let x = dir.path().join("only-residue.xml");
        fs::write(&x, "<feed><doc><abstract>{{x}}</abstract></doc></feed>").unwrap();
        assert!(matches!(
            read_documents(&x),
            Err(DocumentError::Empty { .. })
        ));
        let missing = dir.path().join("missing.txt");
        let msg = read_documents(&missing).unwrap_err().to_string();
        assert!(msg.contains("missing.txt"), "{msg}");
    }
}
