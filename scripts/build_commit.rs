//! The build script of nsa-train and nsa-infer: records the commit the binaries are built from
//! (`BUILD_GIT_COMMIT`: the short hash, with `-dirty` when tracked files differ from it;
//! `unknown` outside a git checkout), shown by `--version` and written into every benchmark
//! record, so that each result names the code that produced it.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    for path in [
        "../.git/HEAD",
        "../.git/index",
        "../.git/refs",
        "../.git/packed-refs",
        "../Cargo.toml",
        "../Cargo.lock",
        "../kernels",
        "../runtime",
        "../model",
        "../train",
        "../infer",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            // the code only: an edited README does not change the binaries
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "../Cargo.toml",
                "../Cargo.lock",
                "../kernels",
                "../runtime",
                "../model",
                "../train",
                "../infer",
                "../scripts/build_commit.rs",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}-dirty")
            } else {
                hash
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
}
