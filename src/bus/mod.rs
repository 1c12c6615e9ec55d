//! The Salt event bus's wire format: frames in ([`framing`]) and out ([`encode`]).
//!
//! Kept apart from the [`crate::source`] that does the I/O, as mini-redis
//! keeps its frame apart from its connection: framing is pure and is tested
//! byte by byte, the source only moves bytes.

pub mod encode;
pub mod framing;
