//! The `postgres` sink's keys, their checks, and the connection they describe.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sink_api::ConfigError;

use crate::tls::PostgresTls;

/// Writes readings into a PostgreSQL table with `COPY`, one transaction per
/// batch; a batch counts as written once its transaction has committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// The database: a URL (`"postgres://sink:secret@127.0.0.1:5432/telemetry"`)
    /// or libpq's key=value form (`"host=127.0.0.1 user=sink dbname=telemetry"`);
    /// put the password in with `${VAR}` or leave it to `password_file`. A
    /// reload that changes it moves writing to the new database once it
    /// answers and has the table, losing nothing.
    pub url: String,
    /// The table to write, optionally schema-qualified (`"readings"`,
    /// `"metrics.readings"`, `"\"Readings\""`). It must have the columns
    /// `sensor_name`, `labels`, `sensor_value`, `sensor_value_float`,
    /// `created_at` and `received_at` (docs/stages/postgres.md); other
    /// columns need a default.
    pub table: String,
    /// Create `table` with the sink's schema when it does not exist.
    #[serde(default)]
    pub create_table: bool,
    /// `"copy_binary"` (fastest), `"copy_text"` or `"insert"` (one
    /// `INSERT … SELECT FROM unnest(…)` per transaction, for poolers or
    /// proxies that do not pass `COPY`).
    #[serde(default)]
    pub method: Method,
    /// A file holding the password (its first line), read at every
    /// connection so that a rotated secret is picked up; overrides a
    /// password in `url`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The most rows per transaction: a larger batch is written in several,
    /// each committed before the next starts.
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// TLS to the server: `{ mode = "verify-full", ca = "ca.crt" }` (modes
    /// `"verify-full"`, `"verify-ca"`, `"require"`, as libpq's `sslmode`;
    /// `cert` and `key` for a client certificate). Absent: plaintext.
    #[serde(default)]
    pub tls: Option<PostgresTls>,
    /// How long connecting may take before it counts as failed and is retried.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub connect_timeout: Duration,
    /// How long one statement may run on the server (`SET LOCAL
    /// statement_timeout`); the sink also gives up on a transaction the
    /// server has not answered within it (a stalled server), reconnects and
    /// retries.
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub statement_timeout: Duration,
}

fn default_max_batch_rows() -> usize {
    10_000
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}

/// How rows reach the table.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `COPY … FROM STDIN (FORMAT binary)`.
    #[default]
    CopyBinary,
    /// `COPY … FROM STDIN` in the text format.
    CopyText,
    /// `INSERT … SELECT FROM unnest($1, …)`.
    Insert,
}

impl PostgresSinkConfig {
    /// Checks what types cannot; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let config = tokio_postgres::Config::from_str(&self.url).map_err(|err| {
            ConfigError::new("url", format!("not a PostgreSQL connection string: {err}"))
        })?;
        if config.get_hosts().is_empty() {
            return Err(ConfigError::new("url", "names no host"));
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require && self.tls.is_none() {
            return Err(ConfigError::new(
                "url",
                "sslmode=require: say how to check the server with the `tls` key instead \
                 (`tls = { mode = \"verify-full\", ca = \"ca.crt\" }`, or `mode = \"require\"`)",
            ));
        }
        if let Some(tls) = &self.tls {
            tls.check()
                .map_err(|(key, message)| ConfigError::new(key, message))?;
        }
        table_name(&self.table).map_err(|err| ConfigError::new("table", err))?;
        if self.max_batch_rows == 0 {
            return Err(ConfigError::new("max_batch_rows", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new("connect_timeout", "must be more than 0s"));
        }
        if self.statement_timeout < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "statement_timeout",
                "must be at least 1ms",
            ));
        }
        Ok(())
    }

    /// Whether `other` writes to another database or table, which takes a
    /// new connection; every other key applies to the one there is.
    pub fn target_differs(&self, other: &Self) -> bool {
        self.url != other.url
            || self.table != other.table
            || self.create_table != other.create_table
            || self.password_file != other.password_file
            || self.connect_timeout != other.connect_timeout
            || self.tls != other.tls
    }

    /// The connection settings, with the password from `password_file`.
    pub async fn connection(&self) -> Result<tokio_postgres::Config, String> {
        let mut config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|err| format!("not a PostgreSQL connection string: {err}"))?;
        config.connect_timeout(self.connect_timeout);
        if self.tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_application_name().is_none() {
            config.application_name("telemetry-sink");
        }
        if let Some(file) = &self.password_file {
            let text = tokio::fs::read_to_string(file)
                .await
                .map_err(|err| format!("cannot read password_file `{}`: {err}", file.display()))?;
            config.password(text.lines().next().unwrap_or_default());
        }
        Ok(config)
    }

    /// The database in words for logs, without the password.
    pub fn describe(&self) -> String {
        let Ok(config) = tokio_postgres::Config::from_str(&self.url) else {
            return "(bad url)".into();
        };
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => String::new(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            config.get_user().unwrap_or("?"),
            config.get_dbname().unwrap_or("?")
        )
    }
}

/// Checks that `table` is `name` or `schema.name`, each part a plain
/// identifier or a double-quoted one, so that it can stand in SQL as written.
pub fn table_name(table: &str) -> Result<(), String> {
    let mut rest = table;
    let mut parts = 0;
    loop {
        parts += 1;
        if let Some(quoted) = rest.strip_prefix('"') {
            // A quoted identifier: `""` stands for a quote inside it.
            let mut end = None;
            let bytes = quoted.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'"' {
                    if bytes.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    end = Some(i);
                    break;
                }
                i += 1;
            }
            let end = end.ok_or("a quoted name lacks its closing `\"`")?;
            if end == 0 || quoted[..end].contains('\0') {
                return Err("a quoted name is empty".into());
            }
            rest = &quoted[end + 1..];
        } else {
            let len = rest
                .char_indices()
                .find(|&(i, c)| !(c.is_alphanumeric() || c == '_' || (i > 0 && c == '$')))
                .map_or(rest.len(), |(i, _)| i);
            let word = &rest[..len];
            if word.is_empty() || word.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!(
                    "`{table}` is not a table name: give `name` or `schema.name`, each a plain \
                     identifier or one in double quotes"
                ));
            }
            rest = &rest[len..];
        }
        match rest.strip_prefix('.') {
            Some(next) if parts < 2 => rest = next,
            Some(_) => return Err(format!("`{table}` has more than `schema.name`")),
            None if rest.is_empty() => return Ok(()),
            None => {
                return Err(format!(
                    "`{table}` is not a table name: unexpected `{rest}` (quote a name with spaces or capitals)"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_plain_qualified_and_quoted_are_taken() {
        for good in [
            "readings",
            "metrics.readings",
            "\"Readings\"",
            "\"my schema\".\"a \"\"b\"\"\"",
            "_r$1",
        ] {
            assert_eq!(table_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "a.b.c",
            "readings; drop table x",
            "\"open",
            "1abc",
            "a.",
            "\"\"",
        ] {
            assert!(table_name(bad).is_err(), "{bad}");
        }
    }

    fn config(url: &str) -> PostgresSinkConfig {
        PostgresSinkConfig {
            url: url.into(),
            table: "readings".into(),
            create_table: false,
            method: Method::default(),
            password_file: None,
            tls: None,
            max_batch_rows: 10,
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn both_url_forms_are_read_and_described_without_the_password() {
        let url = config("postgres://sink:secret@db.example:6543/telemetry");
        assert_eq!(url.validate(), Ok(()));
        assert_eq!(url.describe(), "sink@db.example:6543/telemetry");
        let pairs = config("host=127.0.0.1 user=sink password='se cret' dbname=t");
        assert_eq!(pairs.validate(), Ok(()));
        assert_eq!(pairs.describe(), "sink@127.0.0.1:5432/t");
        assert!(config("postgres://[::1").validate().is_err());
        assert!(config("dbname=t").validate().is_err(), "no host");
    }
}
