//! Test support for the backend tests: the fake VMM.

pub mod fake_vmm;
