//! # sink-mqtt: the `mqtt` source
//!
//! Subscribes to an MQTT broker (Mosquitto, EMQX, HiveMQ, ...) and writes
//! what sensors publish, one small message per reading, with nothing the
//! broker delivered lost through a crash, a restart or a broker failure: a
//! QoS 1 message is acknowledged (PUBACK) only once its readings are accepted
//! or written, and a persistent session makes the broker deliver again what
//! was not.
//!
//! | module | what |
//! |---|---|
//! | [`source`] | the stage: its keys, the connection task, acknowledgements |
//! | [`topic`] | `topic_pattern`: names and labels from topic levels |
//! | [`payload`] | `payload`: a number, JSON readings, or `sensor.v1` protobuf |
//!
//! The default `sink` binary links this crate; a distribution that does not
//! want MQTT leaves it out.

mod connect;
pub mod payload;
pub mod source;
pub mod topic;

pub use connect::{Broker, Brokers, ClientTls};
