//! net harness (placeholder)
