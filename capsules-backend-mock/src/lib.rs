//! capsules-backend-mock (being written).
