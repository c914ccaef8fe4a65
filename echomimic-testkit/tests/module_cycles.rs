//! Inside every crate of the workspace, modules depend on each other one way: shared state and
//! types live in modules below the ones that use them, never in a module that uses them back.
//! (Takes a few milliseconds: it reads the source text.)

use std::path::Path;

use echomimic_testkit::modules::{cycles, graph};

#[test]
fn no_module_depends_on_itself_through_others() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    let mut checked = 0;
    for krate in [
        "echomimic-protocol",
        "echomimic-tempfile",
        "echomimic-pipeline",
        "echomimic-worker",
        "echomimic-testkit",
        "benches",
    ] {
        let src = root.join(krate).join("src");
        assert!(src.is_dir(), "{} is missing", src.display());
        let g = graph(&src);
        checked += g.len();
        for c in cycles(&g) {
            problems.push(format!("{krate}: {c}"));
        }
    }
    assert!(checked > 50, "only {checked} modules found");
    assert!(
        problems.is_empty(),
        "module cycles (move the shared part into a module both can use):\n{}",
        problems.join("\n")
    );
}
