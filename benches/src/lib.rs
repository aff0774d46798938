//! Criterion benches for Capsules live in `benches/`.
