//! Records the commit the binary is built from (`ECHOMIMIC_GIT_HASH`, shown by the
//! `echomimic_build_info` metric and `echomimic-worker status`): the variable when set (a
//! packager's build), else `git rev-parse`, else `unknown` (a source tarball).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ECHOMIMIC_GIT_HASH");
    let git_dir = std::path::Path::new("../.git");
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        let path = git_dir.join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let hash = std::env::var("ECHOMIMIC_GIT_HASH")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=ECHOMIMIC_GIT_HASH={hash}");
}
