//! A route: what an agent does with one environment's requests.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::key::Key;
use super::target::Mode;
use crate::filter::FilterSpec;

/// One environment's route on a target, as previewd sends it to the agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub key: Key,
    pub mode: Mode,
    pub filter: FilterSpec,
    /// Ports it applies to; empty means every intercepted port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// The preview pod's address; the port is the request's own.
    pub destination: IpAddr,
    /// Unix ms after which the agent drops the route on its own.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}
