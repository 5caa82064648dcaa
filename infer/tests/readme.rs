//! Every `nsa-train`, `nsa-infer` and `nsa-bench` command of README.md and BENCHMARKS.md is
//! one the binaries accept: commands in code blocks (and `cargo run -p ... -- ...` lines) are
//! parsed against the real clap definitions (`Command::try_get_matches_from`); synopses with
//! placeholders (`[--config my.toml]`, `tiny|seed`, `DIR`) and commands in inline code have
//! their command and each of their flags looked up; and every inline `--flag` names an option
//! of some command.

use std::path::PathBuf;

use clap::CommandFactory;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The clap definition of a binary.
fn command_of(program: &str) -> Option<clap::Command> {
    Some(match program {
        "nsa-train" => nsa_train::cli::Cli::command(),
        "nsa-infer" => nsa_infer::cli::Cli::command(),
        "nsa-bench" => nsa_infer::bench_cli::Cli::command(),
        _ => return None,
    })
}

/// Shell-like words of `line`: whitespace-separated, quotes grouping (and removed).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

/// The commands of a markdown file: `(origin, program, args, synopsis)`.
fn commands(file: &str) -> Vec<(String, String, Vec<String>, bool)> {
    let text = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut lines: Vec<(usize, String, bool)> = Vec::new(); // (line, text, in a code block)
    let mut in_block = false;
    let mut pending = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            // continuation lines
            if let Some(head) = line.trim_end().strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let full = std::mem::take(&mut pending) + line;
            lines.push((i + 1, full, true));
        } else {
            // inline code spans
            for (j, span) in line.split('`').enumerate() {
                if j % 2 == 1 {
                    lines.push((i + 1, span.to_string(), false));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (line, text, block) in lines {
        // drop a trailing comment of a code line
        let text = if block {
            match text.find(" #") {
                Some(at) => text[..at].to_string(),
                None => text,
            }
        } else {
            text
        };
        for segment in text
            .split("&&")
            .flat_map(|s| s.split('|').collect::<Vec<_>>())
        {
            let w = words(segment);
            let (program, args) = match w.iter().position(|x| x == "cargo") {
                Some(c) if w.get(c + 1).is_some_and(|x| x == "run") => {
                    let Some(p) = w.iter().position(|x| x == "-p") else {
                        continue;
                    };
                    match w.iter().position(|x| x == "--") {
                        Some(dash) => (w[p + 1].clone(), w[dash + 1..].to_vec()),
                        // `cargo run -p nsa-infer` alone runs with no arguments
                        None => (w[p + 1].clone(), Vec::new()),
                    }
                }
                // a program by name or by path (`./target/release/nsa-train`)
                _ => match w.first().map(|p| p.rsplit('/').next().unwrap_or(p)) {
                    Some(p) if command_of(p).is_some() => (p.to_string(), w[1..].to_vec()),
                    _ => continue,
                },
            };
            // `a|b` alternatives split the segment above: re-join the synopsis test on the
            // original text
            let synopsis = segment.contains('[')
                || text.contains('|') && !text.contains("| nsa-")
                || args.iter().any(|a| {
                    a.contains("...")
                        || !a.is_empty()
                            && a.chars()
                                .all(|c| c.is_ascii_uppercase() || c == '_' || c == ',')
                })
                // inline code names commands and flags in prose: checked as a synopsis
                || !block;
            out.push((format!("{file}:{line}"), program, args, synopsis));
        }
    }
    out
}

/// The long and short flags a command (or its subcommand) takes, aliases included.
fn flags(cmd: &clap::Command) -> Vec<String> {
    let mut v = vec!["--help".to_string(), "-h".to_string()];
    if cmd.get_version().is_some() {
        v.push("--version".into());
        v.push("-V".into());
    }
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            v.push(format!("--{l}"));
        }
        if let Some(s) = a.get_short() {
            v.push(format!("-{s}"));
        }
        for alias in a.get_all_aliases().unwrap_or_default() {
            v.push(format!("--{alias}"));
        }
    }
    v
}

#[test]
fn the_documented_commands_are_accepted() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in ["README.md", "BENCHMARKS.md"] {
        for (origin, program, args, synopsis) in commands(file) {
            let cmd = command_of(&program).unwrap_or_else(|| panic!("{origin}: {program}"));
            checked += 1;
            if !synopsis {
                let argv = std::iter::once(program.clone()).chain(args.iter().cloned());
                if let Err(e) = cmd.clone().try_get_matches_from(argv) {
                    if !matches!(
                        e.kind(),
                        clap::error::ErrorKind::DisplayHelp
                            | clap::error::ErrorKind::DisplayVersion
                    ) {
                        failures.push(format!("{origin}: `{program} {}`: {e}", args.join(" ")));
                    }
                }
                continue;
            }
            // a synopsis: each flag exists on the (sub)command
            let sub = args
                .first()
                .and_then(|a| cmd.find_subcommand(a.trim_matches(['[', ']'])).cloned());
            if cmd.has_subcommands() && sub.is_none() {
                if let Some(a) = args.first().filter(|a| !a.starts_with(['-', '['])) {
                    failures.push(format!("{origin}: `{program}` has no command {a}"));
                }
            }
            let known = flags(sub.as_ref().unwrap_or(&cmd));
            for a in &args {
                for part in a.split('|') {
                    let flag = part
                        .trim_matches(['[', ']', '.', ','])
                        .split('=')
                        .next()
                        .unwrap_or("");
                    if flag.starts_with('-') && flag.len() > 1 && !known.contains(&flag.to_string())
                    {
                        failures.push(format!(
                            "{origin}: `{program}`{}: no option {flag}",
                            sub.as_ref()
                                .map(|s| format!(" {}", s.get_name()))
                                .unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} commands found in the docs");
    assert!(
        failures.is_empty(),
        "documented commands that the binaries refuse:\n{}",
        failures.join("\n")
    );
}

/// An inline `--flag` in README.md is an option of some command (or one of cargo's).
#[test]
fn every_inline_flag_exists() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut known: Vec<String> = [
        "--release",
        "--features",
        "--no-default-features",
        "--workspace",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for program in ["nsa-train", "nsa-infer", "nsa-bench"] {
        let cmd = command_of(program).unwrap();
        known.extend(flags(&cmd));
        for sub in cmd.get_subcommands() {
            known.extend(flags(sub));
        }
    }
    let mut unknown = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for (j, span) in line.split('`').enumerate() {
            if j % 2 == 1 && span.starts_with("--") {
                let flag = span.split([' ', '=']).next().unwrap();
                if !known.iter().any(|k| k == flag) {
                    unknown.push(format!("README.md:{}: {flag}", i + 1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "flags in the README that no command has:\n{}",
        unknown.join("\n")
    );
}

/// `cargo run -p nsa-infer -- ...` runs the CLI: the package has two binaries, so cargo needs
/// `default-run` to choose.
#[test]
fn cargo_run_picks_the_cli() {
    let manifest = std::fs::read_to_string(root().join("infer/Cargo.toml")).unwrap();
    assert!(manifest.contains("default-run = \"nsa-infer\""));
}

#[test]
fn the_parser_finds_commands() {
    // the extraction itself: a cargo-run line, a pipe, a synopsis
    assert_eq!(words(r#"a "b c" 'd'"#), vec!["a", "b c", "d"]);
    let all = commands("README.md");
    assert!(all
        .iter()
        .any(|(_, p, a, s)| p == "nsa-infer" && a.first().is_some_and(|x| x == "generate") && !s));
    assert!(all.iter().any(|(_, p, _, s)| p == "nsa-train" && *s));
}
