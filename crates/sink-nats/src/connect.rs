//! What both NATS stages share: the servers, credentials and TLS keys, turned
//! into a connection; and the startup check that runs before the pipeline
//! starts, so that a misnamed stream is reported like every other mistake.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions};
use serde::{Deserialize, Serialize};
use sink_api::{ConfigError, ShutdownSignal};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One NATS server URL, or several of the same cluster: `"nats://127.0.0.1:4222"`,
/// `["nats://a:4222", "nats://b:4222"]`, or one string of URLs separated by
/// commas, as `NATS_URL` is often written (`"nats://a:4222,nats://b:4222"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Servers {
    /// One server.
    One(String),
    /// Several servers; the client connects to one and fails over to the others.
    Many(Vec<String>),
}

impl Servers {
    fn list(&self) -> Vec<String> {
        match self {
            Self::One(urls) => urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(String::from)
                .collect(),
            Self::Many(urls) => urls.clone(),
        }
    }

    /// The servers in words, for messages.
    pub fn describe(&self) -> String {
        self.list().join(", ")
    }
}

/// How to authenticate: at most one of `creds_file`, `token`, or `user` with
/// `password`. Absent: no authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// A NATS `.creds` file (JWT and NKey seed), as `nsc` writes it.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// A token the server expects.
    #[serde(default)]
    pub token: Option<String>,
    /// A user name; needs `password`.
    #[serde(default)]
    pub user: Option<String>,
    /// The user's password.
    #[serde(default)]
    pub password: Option<String>,
}

/// TLS towards the NATS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the CA that signed the servers' certificates (default:
    /// the system's roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require one; needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The credentials cannot be read, or the servers refuse them: a mistake
    /// in the file, reported at startup.
    #[error("credentials refused: {0}")]
    Credentials(std::io::Error),
    /// TLS cannot be set up: a file of `tls` is missing or bad, or the
    /// servers' certificate or ours is refused. A mistake, reported at startup.
    #[error("TLS refused: {0}")]
    Tls(ConnectError),
    /// The servers cannot be reached (now): retried.
    #[error("{0}")]
    Unreachable(ConnectError),
}

/// Where and how a stage connects; built from its config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Connection {
    pub servers: Servers,
    pub auth: Option<Credentials>,
    pub tls: Option<NatsTls>,
    /// The stage id, as the client's name on the server (`nats server report connections`).
    pub name: String,
}

impl Connection {
    /// Checks the keys of the connection; each error names its key.
    pub fn validate(
        servers: &Servers,
        auth: Option<&Credentials>,
        tls: Option<&NatsTls>,
    ) -> Result<(), ConfigError> {
        let list = servers.list();
        if list.is_empty() {
            return Err(ConfigError::new("url", "must name at least one server"));
        }
        for url in &list {
            url.parse::<async_nats::ServerAddr>().map_err(|err| {
                ConfigError::new("url", format!("`{url}` is not a NATS server URL: {err}"))
            })?;
        }
        if let Some(auth) = auth {
            let given = [
                auth.creds_file.is_some(),
                auth.token.is_some(),
                auth.user.is_some(),
            ];
            if given.iter().filter(|g| **g).count() > 1 {
                return Err(ConfigError::new(
                    "auth",
                    "give one of `creds_file`, `token` or `user`",
                ));
            }
            if auth.user.is_some() != auth.password.is_some() {
                return Err(ConfigError::new(
                    "auth.password",
                    "`user` and `password` go together",
                ));
            }
        }
        if let Some(tls) = tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(ConfigError::new("tls.key", "`cert` and `key` go together"));
        }
        Ok(())
    }

    async fn options(&self) -> std::io::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .name(&self.name)
            .connection_timeout(CONNECT_TIMEOUT)
            // Reconnect forever: the stages hold their data and retry meanwhile.
            .max_reconnects(None);
        if let Some(auth) = &self.auth {
            if let Some(file) = &auth.creds_file {
                options = options.credentials_file(file).await?;
            }
            if let Some(token) = &auth.token {
                options = options.token(token.clone());
            }
            if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
                options = options.user_and_password(user.clone(), password.clone());
            }
        }
        if let Some(tls) = &self.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        Ok(options)
    }

    /// Connects once; the error says why not.
    pub async fn connect(&self) -> Result<Client, Refused> {
        let options = self.options().await.map_err(Refused::Credentials)?;
        options
            .connect(self.servers.list())
            .await
            .map_err(|err| match err.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    Refused::Credentials(std::io::Error::other(err))
                }
                ConnectErrorKind::Tls => Refused::Tls(err),
                _ if refused_by_tls(&err) => Refused::Tls(err),
                _ => Refused::Unreachable(err),
            })
    }

    /// Connects, retrying with backoff until it succeeds or shutdown starts
    /// (`None`). Logs the first failure and then every tenth.
    pub async fn connect_until(&self, stage: &str, shutdown: &ShutdownSignal) -> Option<Client> {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return None,
                connected = self.connect() => match connected {
                    Ok(client) => {
                        if failures > 0 {
                            tracing::info!(stage, "connected to NATS ({}) after {failures} failed attempts", self.servers.describe());
                        }
                        return Some(client);
                    }
                    Err(err) => {
                        if failures.is_multiple_of(10) {
                            tracing::warn!(stage, "cannot connect to NATS ({}), retrying: {err}", self.servers.describe());
                        }
                        failures += 1;
                    }
                },
            }
            tokio::select! {
                _ = shutdown.wait() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Runs `check` against the servers at startup, on a thread of its own
    /// (a stage is built outside any particular runtime). Servers that cannot
    /// be reached are not a mistake in the file: the stage retries once
    /// running, and this says so in the log.
    pub fn check_at_startup<F, Fut>(&self, stage: &str, check: F) -> Result<(), ConfigError>
    where
        F: FnOnce(Client) -> Fut + Send,
        Fut: Future<Output = Result<(), ConfigError>>,
    {
        let connection = self.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|err| ConfigError::new("url", format!("cannot start a runtime: {err}")))?;
                    runtime.block_on(async {
                        match connection.connect().await {
                            Ok(client) => check(client).await,
                            Err(err @ Refused::Credentials(_)) => Err(ConfigError::new(
                                "auth",
                                format!("NATS ({}): {err}", connection.servers.describe()),
                            )),
                            Err(err @ Refused::Tls(_)) => Err(ConfigError::new(
                                "tls",
                                format!("NATS ({}): {err}", connection.servers.describe()),
                            )),
                            Err(err) => {
                                tracing::warn!(stage, "NATS ({}) is not reachable at startup; the stage will keep retrying: {err}", connection.servers.describe());
                                Ok(())
                            }
                        }
                    })
                })
                .join()
                .unwrap_or_else(|_| Err(ConfigError::new("url", "the startup check panicked")))
        })
    }
}

/// Whether `err` came from a TLS handshake that failed (a certificate the
/// server or we refused), which the client reports as an I/O error: retrying
/// cannot fix it.
fn refused_by_tls(err: &ConnectError) -> bool {
    let mut cause = std::error::Error::source(err);
    while let Some(error) = cause {
        let tls = error.downcast_ref::<rustls::Error>().is_some()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if tls {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::Servers;

    #[test]
    fn a_comma_separated_string_names_several_servers() {
        let servers = Servers::One("nats://a:4222, nats://b:4222,nats://c:4222".into());
        assert_eq!(
            servers.list(),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        assert_eq!(
            Servers::One("nats://a:4222".into()).list(),
            ["nats://a:4222"]
        );
        for url in servers.list() {
            assert!(url.parse::<async_nats::ServerAddr>().is_ok(), "{url}");
        }
    }
}
