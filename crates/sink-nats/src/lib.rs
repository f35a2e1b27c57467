//! # sink-nats: NATS JetStream stages
//!
//! Two stage types that join `sink` processes through a durable, replicated
//! JetStream stream, so that an ingest tier and a writing tier scale and fail
//! apart:
//!
//! | kind | type | module |
//! |---|---|---|
//! | sink | `nats` | [`sink`]: publishes every batch, done once JetStream acknowledged it |
//! | source | `nats` | [`source`]: a durable pull consumer, acknowledging a message once written |
//!
//! The default `sink` binary links this crate; a distribution that does not
//! want NATS leaves it out.

pub mod codec;
mod connect;
mod delivery;
pub mod sink;
pub mod source;

pub use connect::{Credentials, NatsTls, Servers};
