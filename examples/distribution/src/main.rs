//! `sink-custom`: the `sink` command line with three more stage types,
//! `scale`, `filter` and `csv_file`, linked in beside the built-in ones.
//!
//! Each stage crate must be named here. Stage types register themselves at
//! link time (`typetag` and `inventory` collect them from the linked object
//! files), and the linker leaves out a crate that nothing refers to: a stage
//! crate that is only a dependency in Cargo.toml vanishes without a word, and
//! its `type` is then "unknown" in `pipeline.toml`. `use ... as _;` refers to
//! the crate without importing a name. The built-in stages come with `sink`.

use sink_example_csv as _;
use sink_example_filter as _;
use sink_example_scale as _;

fn main() -> std::process::ExitCode {
    sink::run()
}
