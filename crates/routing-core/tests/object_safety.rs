//! The policy traits are object safe: routers hold them as `Box<dyn _>` / `Arc<dyn _>`.
//! This file fails to compile if that ever changes.

use std::sync::Arc;

use routing_core::{Candidate, InMemoryMarks, LeastOutstanding, ReplicaPicker, WriterMarks};

#[test]
fn policy_traits_are_object_safe() {
    let pickers: Vec<Box<dyn ReplicaPicker>> = vec![
        Box::new(LeastOutstanding),
        Box::new(|c: &[Candidate<'_>]| c.len() - 1),
    ];
    let marks: Arc<dyn WriterMarks> = Arc::new(InMemoryMarks::default());
    assert_eq!(pickers.len(), 2);
    assert!(Arc::strong_count(&marks) == 1);
}
