//! Runnable material: the consistency checker (`cargo xtask chaos`), the product tour
//! (`cargo xtask demo`), the web examples' service ([`web_service`]) with a minimal HTTP
//! client ([`http`]), benchmark workloads ([`offload`], [`peer`]) and the HA workload ([`ha`],
//! `cargo xtask ha`). Not published.

pub mod chaos;
pub mod chart;
pub mod failover;
pub mod ha;
pub mod http;
pub mod offload;
pub mod peer;
pub mod prometheus;
pub mod web_service;
