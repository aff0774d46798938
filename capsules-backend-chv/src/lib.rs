//! capsules-backend-chv (being written).
