//! Cross-crate integration tests live in `tests/tests/`; this library holds shared helpers for them
//! and for the bench binaries in `src/bin/`.

pub mod stor;
pub mod virtio_driver;
