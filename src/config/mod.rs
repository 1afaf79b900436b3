//! What the user configured: mount options (`-o` and flags), credentials from
//! the auth files every container tool shares, and `registries.conf` v2.
//!
//! Everything here is parsed once at start-up and immutable afterwards.

pub mod auth;
pub mod options;
pub mod registries;

pub use auth::{AuthFile, Credential};
pub use options::{MountOptions, parse_size};
pub use registries::{RegistriesConf, RegistryEntry};
