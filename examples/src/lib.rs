//! Runnable material: the consistency checker (`cargo xtask chaos`) and the product tour
//! (`cargo xtask demo`). Not published.

pub mod chaos;
pub mod ha;
