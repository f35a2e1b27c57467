//! # sink-postgres: the `postgres` sink
//!
//! Writes readings into a PostgreSQL table with `COPY` (binary by default),
//! one transaction per batch; a batch counts as written, and its clients'
//! acknowledgements as done, only once its transaction has committed. The
//! table's columns are checked at startup; a database that restarts or
//! stalls is reconnected to and the batch retried, with backpressure
//! reaching the sources meanwhile; a COMMIT whose answer was lost is settled
//! by asking the server (`txid_status`), so it is not written twice.
//!
//! The default `sink` binary links this crate; a distribution that does not
//! want PostgreSQL leaves it out. Users' documentation: docs/stages/postgres.md.

pub mod config;
pub mod encode;
pub mod schema;
mod sink;
pub mod tls;

pub use config::{Method, PostgresSinkConfig};
pub use tls::{PostgresTls, TlsMode};
