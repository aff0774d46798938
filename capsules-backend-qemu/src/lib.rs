//! capsules-backend-qemu (being written).
