//! Disk backends: an in-memory disk and raw image files (io_uring, with a pread/pwrite fallback).

pub mod mem;
