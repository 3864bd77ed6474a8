//! The XDP and TC programs live in the `lb-ebpf` binary (src/main.rs). This library target only
//! exists so that `lb-userspace` can name this crate as a build dependency and be rebuilt when it
//! changes.
#![no_std]
