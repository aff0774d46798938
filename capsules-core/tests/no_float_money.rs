//! Invariant: no floating point anywhere money flows. Greps the money modules' sources.

use std::path::Path;

const MONEY_FILES: &[&str] = &[
    "src/types/money.rs",
    "src/types/limits.rs",
    "src/ledger.rs",
    "src/records.rs",
    "src/store/mod.rs",
    "src/store/memory.rs",
    "src/store/memory/capsules.rs",
    "src/service/client.rs",
    "src/service/admin.rs",
];

#[test]
fn money_modules_have_no_floating_point() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in MONEY_FILES {
        let text = std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for bad in ["f32", "f64", "as_secs_f", "from_secs_f"] {
                let hit = code
                    .match_indices(bad)
                    .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
                assert!(!hit, "{f}:{}: floating point ({bad}) in a money path: {line}", n + 1);
            }
        }
    }
}

#[test]
fn the_grep_can_fail() {
    let code = "let x: f64 = 1.0;";
    assert!(
        code.match_indices("f64")
            .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_alphanumeric()))
    );
}
