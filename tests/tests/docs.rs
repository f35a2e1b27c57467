//! The docs cannot drift from the code: README.md and every page under
//! docs/ are read here, and
//!
//! - docs/reference.md must be exactly what `sink describe --markdown` says;
//! - every ```toml block must parse, and a whole pipeline (one with sources
//!   and sinks) must pass the real `sink validate`; every ```json block must
//!   be JSON (or JSON lines);
//! - every `sink ...` command line, in a shell block or inline, must parse
//!   with the real command line (clap);
//! - every relative link must name a file that exists, and an anchor a
//!   heading of that file;
//! - every stage type the binary has must have its page, docs/stages/TYPE.md,
//!   naming each of its keys, and docs/hot-reload.md's table must name every
//!   key that reloads live;
//! - the README's test command must be the one `.ci/run` runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use sink_e2e::sink_binary;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// README.md and every Markdown file under docs/, as (path from the root, text).
fn pages() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                found.push(path);
            }
        }
    }
    let root = root();
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let relative = path.strip_prefix(&root).expect("under root").to_path_buf();
            (relative, text)
        })
        .collect()
}

/// A fenced code block of a page.
struct Block {
    file: PathBuf,
    /// The line of its opening fence, from 1.
    line: usize,
    language: String,
    text: String,
}

impl Block {
    fn place(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// Every fenced block of `text`; an indented fence (in a list item) has its
/// indentation taken off every line of the block.
fn blocks(file: &Path, text: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(usize, usize, String, Vec<&str>)> = None;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(language) = trimmed.strip_prefix("```") {
                    open = Some((number + 1, indent, language.trim().to_string(), Vec::new()));
                }
            }
            Some((start, indent, language, lines)) => {
                if trimmed.starts_with("```") {
                    found.push(Block {
                        file: file.to_path_buf(),
                        line: *start,
                        language: std::mem::take(language),
                        text: lines.join("\n") + "\n",
                    });
                    open = None;
                } else {
                    let cut = line
                        .char_indices()
                        .find(|(at, c)| *at >= *indent || !c.is_whitespace())
                        .map_or(line.len(), |(at, _)| at);
                    lines.push(&line[cut..]);
                }
            }
        }
    }
    assert!(
        open.is_none(),
        "{}: a code fence is never closed",
        file.display()
    );
    found
}

fn all_blocks() -> Vec<Block> {
    pages()
        .iter()
        .flat_map(|(file, text)| blocks(file, text))
        .collect()
}

#[test]
fn the_stage_reference_is_what_the_binary_says() {
    let out = Command::new(sink_binary())
        .args(["describe", "--markdown"])
        .current_dir(root())
        .output()
        .expect("sink runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    let committed = std::fs::read_to_string(root().join("docs/reference.md")).unwrap_or_default();
    if generated != committed {
        let first = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
        panic!(
            "docs/reference.md differs from what `sink describe --markdown` says (first at line {}: the binary says {:?}, the file {:?}).\n\
             Regenerate it from the repository's root with:\n    {}",
            first + 1,
            generated.lines().nth(first).unwrap_or("(end)"),
            committed.lines().nth(first).unwrap_or("(end)"),
            sink::REFERENCE_COMMAND
        );
    }
}

#[test]
fn every_toml_block_parses_and_every_whole_pipeline_validates() {
    let toml_blocks: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|block| block.language == "toml")
        .collect();
    assert!(toml_blocks.len() > 10, "found only {}", toml_blocks.len());
    let mut pipelines = 0;
    let mut failures = Vec::new();
    for block in &toml_blocks {
        // `${VAR:-default}` takes its default, as with the variable unset.
        let text = match sink::env::substitute(&block.text, |_| None) {
            Ok(text) => text,
            Err(err) => {
                failures.push(format!("{}: {err}", block.place()));
                continue;
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(table) => table,
            Err(err) => {
                failures.push(format!(
                    "{}: not TOML: {err}\n{}",
                    block.place(),
                    block.text
                ));
                continue;
            }
        };
        if !(table.contains_key("sources") && table.contains_key("sinks")) {
            continue;
        }
        pipelines += 1;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), &block.text).expect("write");
        let out = Command::new(sink_binary())
            .args(["validate", "--pipeline", "pipeline.toml"])
            .current_dir(dir.path())
            .env_remove("SINK_PIPELINE")
            .output()
            .expect("sink runs");
        if !out.status.success() {
            failures.push(format!(
                "{}: `sink validate` refuses this pipeline:\n{}\n{}",
                block.place(),
                block.text,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(pipelines >= 3, "found only {pipelines} whole pipelines");
}

/// Splits a shell line into words, honouring quotes and backslashes; the
/// operators that end a command (`|`, `;`, `&&`, `||`, `&`) are words of
/// their own, and a `#` starting a word begins a comment.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        q => word.push(q),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            '|' | ';' | '&' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                words.push(";".into());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The arguments of every `sink` command in `words` (one shell line): after
/// `sink`, `target/release/sink` or `cargo run ... -p sink --`, up to the end
/// of the command or a redirection; leading `VAR=value` words are skipped.
fn sink_commands(words: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for command in words.split(|word| word == ";") {
        let mut rest = command
            .iter()
            .skip_while(|word| word.contains('=') && !word.starts_with('-'));
        let Some(program) = rest.next() else {
            continue;
        };
        let args: Vec<String> = match program.as_str() {
            "sink" | "target/release/sink" | "target/debug/sink" | "./target/release/sink" => {
                rest.cloned().collect()
            }
            "cargo" => {
                let words: Vec<&String> = rest.collect();
                let runs_sink = words.first().is_some_and(|w| *w == "run")
                    && words
                        .windows(2)
                        .any(|pair| pair[0] == "-p" && pair[1] == "sink");
                if !runs_sink {
                    continue;
                }
                match words.iter().position(|word| *word == "--") {
                    Some(at) => words[at + 1..].iter().map(|w| w.to_string()).collect(),
                    None => Vec::new(),
                }
            }
            _ => continue,
        };
        let args = args
            .into_iter()
            .take_while(|word| !word.starts_with('>') && !word.starts_with("2>") && word != "<")
            .collect();
        found.push(args);
    }
    found
}

/// Every `sink ...` command line the pages show: in shell blocks (lines
/// joined at a trailing backslash) and in inline code, the latter marked
/// `true` (a mention in prose may leave out what it requires: `sink top`).
fn command_lines() -> Vec<(String, Vec<String>, bool)> {
    let mut found = Vec::new();
    for (file, text) in pages() {
        for block in blocks(&file, &text) {
            if !["sh", "bash", "shell", "console"].contains(&block.language.as_str()) {
                continue;
            }
            let joined = block.text.replace("\\\n", " ");
            for (i, line) in joined.lines().enumerate() {
                let line = line.trim_start().trim_start_matches("$ ");
                for args in sink_commands(&shell_words(line)) {
                    found.push((format!("{}:{} `{line}`", block.place(), i + 1), args, false));
                }
            }
        }
        // Inline code outside fenced blocks: `sink validate --pipeline FILE`.
        let mut fenced = false;
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            if fenced {
                continue;
            }
            let line = line.replace("\\|", "|");
            for (i, span) in line.split('`').enumerate() {
                let is_command = i % 2 == 1
                    && span.starts_with("sink ")
                    && !span.contains("...")
                    && !span.contains('…');
                if is_command {
                    for args in sink_commands(&shell_words(span)) {
                        found.push((
                            format!("{}:{} `{span}`", file.display(), number + 1),
                            args,
                            true,
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn every_sink_command_line_parses() {
    let lines = command_lines();
    assert!(lines.len() > 20, "found only {} command lines", lines.len());
    let failures: Vec<String> = lines
        .iter()
        .filter_map(|(place, args, inline)| {
            let err = sink::check_args(args).err()?;
            (!(*inline && err.incomplete)).then(|| format!("{place}: {}", err.message.trim_end()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "these command lines do not parse:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn the_command_line_check_can_fail() {
    assert_eq!(
        sink_commands(&shell_words(
            "RATE=1 sink validate --pipelin x.toml | jq . # note"
        )),
        [["validate", "--pipelin", "x.toml"]]
    );
    let err = sink::check_args(["validate", "--pipelin", "x.toml"]).expect_err("misspelt");
    assert!(!err.incomplete, "{}", err.message);
    assert!(sink::check_args(["top"]).expect_err("no --api").incomplete);
    assert!(sink::check_args(["describe", "nats", "--kind", "sink"]).is_ok());
    assert_eq!(
        sink_commands(&shell_words(
            "cargo run --release -p sink -- --pipeline 'a b.toml' > out"
        )),
        [["--pipeline", "a b.toml"]]
    );
    assert!(sink_commands(&shell_words("cargo run -p sink-load -- --count 10")).is_empty());
}

/// GitHub's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.push(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = root();
    let mut failures = Vec::new();
    for (file, text) in pages() {
        let dir = file.parent().unwrap_or(Path::new(""));
        for (i, part) in text.split("](").enumerate().skip(1) {
            let Some(target) = part.split(')').next() else {
                continue;
            };
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let linked = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let on_disk = root.join(&linked);
            if !on_disk.exists() {
                failures.push(format!(
                    "{} (link {i}): `{target}`: no file {}",
                    file.display(),
                    linked.display()
                ));
                continue;
            }
            if !fragment.is_empty() && on_disk.extension().is_some_and(|ext| ext == "md") {
                let linked_text = std::fs::read_to_string(&on_disk).unwrap_or_default();
                if !anchors(&linked_text).iter().any(|a| a == fragment) {
                    failures.push(format!(
                        "{} (link {i}): `{target}`: no heading `#{fragment}` in {}",
                        file.display(),
                        linked.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_readme_test_command_is_the_one_ci_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let command = readme
        .lines()
        .find(|line| line.starts_with("cargo test") && line.contains("# run the tests"))
        .expect("the README's test command, marked `# run the tests`")
        .split('#')
        .next()
        .unwrap_or_default()
        .trim();
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|line| line.trim() == command),
        "the README says the tests run with `{command}`, but .ci/run has no such line"
    );
}

#[test]
fn every_stage_type_has_a_page_that_names_each_of_its_keys() {
    let out = Command::new(sink_binary())
        .args(["describe", "--markdown"])
        .output()
        .expect("sink runs");
    let reference = String::from_utf8(out.stdout).expect("UTF-8");
    // (type, key) for every row of the generated reference.
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut current = None;
    for line in reference.lines() {
        if let Some(heading) = line.strip_prefix("### `") {
            current = heading.split('`').next().map(str::to_string);
        } else if let (Some(name), Some(row)) = (&current, line.strip_prefix("| `")) {
            let key = row.split('`').next().unwrap_or_default();
            keys.push((name.clone(), key.to_string()));
        }
    }
    assert!(keys.len() > 20, "read only {keys:?}");
    let mut failures = Vec::new();
    for (name, key) in keys {
        let page = root().join(format!("docs/stages/{name}.md"));
        let Ok(text) = std::fs::read_to_string(&page) else {
            failures.push(format!("no page docs/stages/{name}.md"));
            continue;
        };
        // A nested key may be written whole, as its last part, or inside
        // its table's example (`{ max_files = 48 }`).
        let last = key.rsplit('.').next().unwrap_or(&key);
        let named = [
            format!("`{key}`"),
            format!("`{last}`"),
            format!("{last} = "),
        ]
        .iter()
        .any(|form| text.contains(form.as_str()));
        if !named {
            failures.push(format!("docs/stages/{name}.md never names the key `{key}`"));
        }
    }
    failures.dedup();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_live_keys_table_names_every_live_key() {
    let out = Command::new(sink_binary())
        .args(["describe", "--markdown"])
        .output()
        .expect("sink runs");
    let reference = String::from_utf8(out.stdout).expect("UTF-8");
    let page = std::fs::read_to_string(root().join("docs/hot-reload.md")).expect("hot-reload.md");
    // The table's rows: first cell (the type, maybe with its kind), second
    // cell (the live keys).
    let rows: Vec<(String, String)> = page
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix('|')?.split(" | ");
            Some((cells.next()?.trim().to_string(), cells.next()?.to_string()))
        })
        .collect();
    let mut failures = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in reference.lines() {
        if let Some(heading) = line.strip_prefix("### `") {
            let mut parts = heading.split('`');
            let name = parts.next().unwrap_or_default().to_string();
            let kind = parts
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_default()
                .to_string();
            current = Some((name, kind));
            continue;
        }
        let (Some((name, kind)), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        let key = row.split('`').next().unwrap_or_default();
        let cells: Vec<&str> = line.split(" | ").collect();
        let live = cells
            .get(3)
            .is_some_and(|reload| reload.starts_with("live"));
        // `when_full` is a key of every sink, in a row of its own.
        if key.contains('.') || !live || key == "when_full" {
            continue;
        }
        let of_type = |cell: &str| {
            cell.starts_with(&format!("`{name}`"))
                && (!cell.contains(" source") && !cell.contains(" sink")
                    || cell.contains(kind.as_str()))
        };
        match rows.iter().find(|(cell, _)| of_type(cell)) {
            None => failures.push(format!(
                "docs/hot-reload.md: no row for {kind} `{name}`, whose `{key}` is live"
            )),
            Some((_, keys)) if !keys.contains(&format!("`{key}`")) => failures.push(format!(
                "docs/hot-reload.md: the row of {kind} `{name}` does not name its live key `{key}`"
            )),
            Some(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_json_block_is_json() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for block in all_blocks().iter().filter(|block| block.language == "json") {
        checked += 1;
        // A whole document, or JSON lines as the sinks and logs write them.
        if serde_json::from_str::<serde_json::Value>(&block.text).is_ok() {
            continue;
        }
        for line in block.text.lines().filter(|line| !line.trim().is_empty()) {
            if let Err(err) = serde_json::from_str::<serde_json::Value>(line) {
                failures.push(format!("{}: {err}: {line}", block.place()));
            }
        }
    }
    assert!(checked >= 3, "found only {checked} JSON blocks");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
