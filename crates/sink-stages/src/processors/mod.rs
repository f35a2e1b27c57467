//! Built-in processors.

pub mod buffered;
