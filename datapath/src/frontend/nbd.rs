//! NBD server (placeholder).
