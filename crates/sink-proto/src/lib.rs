//! Generated code for the `sensor.v1` wire contract of the original Go service.
//!
//! Messages and the client are generated at build time; the server side lives in
//! the `grpc` source stage. [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

#![allow(clippy::all, missing_docs)]

/// `sensor.v1`: `SensorService.SendSensorValues` and its messages.
pub mod sensor {
    pub mod v1 {
        tonic::include_proto!("sensor.v1");
    }
}

pub use sensor::v1::*;

/// Encoded `FileDescriptorSet` of every .proto the service uses, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sensor_descriptor");

/// Full gRPC path of the one method the original served.
pub const SEND_SENSOR_VALUES_PATH: &str = "/sensor.v1.SensorService/SendSensorValues";

/// Fully qualified service name, as health checks and reflection report it.
pub const SERVICE_NAME: &str = "sensor.v1.SensorService";
