//! Per-pod connection registry.
