//! The pipelines that `bench/run` starts stay valid as the configuration
//! evolves: `sink validate` accepts each of them.

use std::path::Path;
use std::process::Command;

#[test]
fn every_bench_pipeline_validates() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench");
    let mut checked = 0;
    for entry in std::fs::read_dir(&bench).expect("bench/ exists") {
        let path = entry.expect("readable bench/").path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let out = Command::new(sink_e2e::sink_binary())
            .arg("validate")
            .arg("--pipeline")
            .arg(&path)
            .output()
            .expect("run sink validate");
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert_eq!(
        checked, 14,
        "bench/ should hold the eleven scenario pipelines"
    );
}
