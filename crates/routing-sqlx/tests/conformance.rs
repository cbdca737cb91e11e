//! The shared conformance suite (tests/conformance), unchanged, against the sqlx backend.

struct SqlxHarness;

impl routing_conformance::Harness for SqlxHarness {
    type B = routing_sqlx::SqlxBackend;

    fn backend() -> Self::B {
        routing_sqlx::SqlxBackend::new()
    }
}

routing_conformance::conformance_tests!(SqlxHarness);
