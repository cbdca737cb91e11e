//! Runnable material: the consistency checker (`cargo xtask chaos`), the product tour
//! (`cargo xtask demo`) and the web examples' service ([`web_service`]) with a minimal HTTP
//! client ([`http`]). Not published.

pub mod chaos;
pub mod http;
pub mod web_service;
