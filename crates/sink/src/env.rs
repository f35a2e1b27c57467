//! `${VAR}` and `${VAR:-default}` substitution in the text of a pipeline file,
//! so that the original's env-file and ConfigMap workflow keeps working.

/// The original service's environment variables, which only
/// `pipelines/original-env.toml` reads in full (`sink` warns when one is set
/// but the pipeline does not name it).
pub const ORIGINAL_VARS: [&str; 6] = [
    "FILE_PATH",
    "BUFFER_SIZE",
    "BUFFER_FLUSH_INTERVAL",
    "RATE_PER_SECOND",
    "GRPC_SERVER_SOCKET",
    "LOGGER_MIN_LOG_LEVEL",
];

/// A reference that could not be substituted: which line, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SubstituteError {
    /// The line of the reference, counting from 1.
    pub line: usize,
    /// What is wrong, naming the variable.
    pub message: String,
}

/// Replaces every `${VAR}` and `${VAR:-default}` in `text` with the value that
/// `lookup` gives; `default` stands in for a variable that is unset or empty.
/// `$${` stands for a literal `${`. Comments (from a `#` outside a quoted
/// string to the end of its line) are left as they are, so a commented-out key
/// or a note never needs its variable. Fails with a message naming the
/// variable and the line.
pub fn substitute(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, SubstituteError> {
    let mut out = String::with_capacity(text.len());
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let (code, comment) = line.split_at(comment_start(line).unwrap_or(line.len()));
        substitute_line(code, &lookup, &mut out).map_err(|message| SubstituteError {
            line: number + 1,
            message,
        })?;
        out.push_str(comment);
    }
    Ok(out)
}

/// Where a TOML comment starts in `line`: its first `#` outside a basic
/// (`"..."`, with `\` escapes) or literal (`'...'`) string. A `#` inside a
/// multi-line string's continuation line counts as a comment here, a case
/// pipeline files do not need.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote = None;
    let mut escaped = false;
    for (index, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(open) if c == open => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' => return Some(index),
            None => {}
        }
    }
    None
}

fn substitute_line(
    line: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut rest = line;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("`{}` has no closing `}}`", after.trim_end()))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{}}}` is not a variable name", &body[..end]));
            }
            // As in the shell and docker compose, `:-` takes the default
            // for a variable that is unset or empty: an `.env` line
            // `BUFFER_SIZE=` keeps the default rather than breaking the file.
            let value = match (lookup(name), default) {
                (Some(value), Some(default)) if value.is_empty() => Some(default.to_string()),
                (Some(value), _) => Some(value),
                (None, default) => default.map(str::to_string),
            };
            match value {
                Some(value) => out.push_str(&value),
                None => {
                    return Err(format!(
                        "environment variable `{name}` is not set and has no default (write `${{{name}:-default}}` to give one)"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("9000".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_values_and_defaults() {
        let text = "a = \"${PORT}\"\nb = ${MISSING:-7}\nc = \"${EMPTY:-x} costs $5, $${LITERAL}\"\nd = \"${EMPTY}\"\n";
        assert_eq!(
            substitute(text, env).unwrap(),
            "a = \"9000\"\nb = 7\nc = \"x costs $5, ${LITERAL}\"\nd = \"\"\n"
        );
    }

    #[test]
    fn names_an_unset_variable_and_its_line() {
        let err = substitute("a = 1\nb = \"${NOPE}\"\n", env).unwrap_err();
        assert_eq!(err.line, 2);
        let text = err.to_string();
        assert!(text.contains("line 2") && text.contains("`NOPE`"), "{text}");
    }

    #[test]
    fn leaves_comment_lines_alone() {
        assert_eq!(substitute("  # ${NOPE}\n", env).unwrap(), "  # ${NOPE}\n");
    }

    #[test]
    fn leaves_trailing_comments_alone_but_not_a_hash_in_a_string() {
        let text = "a = ${PORT} # was ${NOPE}\nb = \"#${PORT}\" # ${NOPE}\nc = '#' # \"${NOPE}\n";
        assert_eq!(
            substitute(text, env).unwrap(),
            "a = 9000 # was ${NOPE}\nb = \"#9000\" # ${NOPE}\nc = '#' # \"${NOPE}\n"
        );
        let escaped = "d = \"\\\"#${PORT}\" # ${NOPE}\n";
        assert_eq!(
            substitute(escaped, env).unwrap(),
            "d = \"\\\"#9000\" # ${NOPE}\n"
        );
    }

    #[test]
    fn refuses_an_unclosed_reference() {
        assert!(
            substitute("a = \"${PORT\"\n", env)
                .unwrap_err()
                .message
                .contains("closing")
        );
    }
}
