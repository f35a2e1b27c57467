//! A binary whose stage type has two names refuses to start, naming both.

use std::process::Command;

#[test]
fn a_type_with_two_names_stops_the_binary_naming_both() {
    for command in [&["validate"][..], &["list"], &["--pipeline", "none.toml"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_sink-name-mismatch"))
            .args(command)
            .output()
            .expect("binary runs");
        let errors = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {errors}");
        assert!(
            errors.contains("as processor `named_in_pipelines` with #[typetag::serde]")
                && errors.contains("as processor `named_in_catalogue` with register_stage!")
                && errors.contains("Mismatched"),
            "{command:?}: {errors}"
        );
        assert!(
            out.stdout.is_empty(),
            "{command:?}: printed before refusing"
        );
    }
}
