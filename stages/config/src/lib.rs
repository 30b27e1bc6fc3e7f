//! newt-config: the pipeline file, from YAML to the typed params each stage receives.
//!
//! ```text
//!  pipeline.yml ──load──> Config (Axolotl keys, enums, defaults) ──validate──> LoadedConfig
//!                                         │
//!        params::*Params::from_config ────┴──> one typed struct per stage kind: its key params
//! ```
//!
//! - [`schema`]: the typed [`Config`]; defaults live there and only there.
//! - [`load`]: reading, key checks ("did you mean"), every value check, at load.
//! - [`axolotl`]: Axolotl keys newt accepts and ignores, and the features it lacks.
//! - [`params`]: the typed params (and run-time settings) of each built-in stage kind.
//! - [`classify`]: every key → the kinds that read it, or why none does; tested against
//!   [`params`].
//!
//! This crate knows no stage code, no graph and no Burn; `newt-data`, `newt-stages` and the CLI
//! read it.
pub mod axolotl;
pub mod classify;
pub mod load;
pub mod params;
pub mod schema;

pub use load::{ConfigError, LoadedConfig, load, locate_key, parse};
pub use schema::*;
