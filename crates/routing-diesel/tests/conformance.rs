//! The shared conformance suite (tests/conformance) run against the diesel-async backend.

use routing_diesel::DieselBackend;

struct DieselHarness;

impl routing_conformance::Harness for DieselHarness {
    type B = DieselBackend;

    fn backend() -> DieselBackend {
        DieselBackend::new()
    }
}

routing_conformance::conformance_tests!(DieselHarness);
