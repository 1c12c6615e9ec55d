//! saltpipe: keeps the job results a SaltStack master sees.
//!
//! The pipeline, in the order an event travels it:
//!
//! * [`source`]: reads the master's event bus ([`bus`] cuts it into frames),
//!   never pausing, reconnecting when the master restarts;
//! * [`event`]: decodes a frame losslessly into a tag, raw data and a typed view;
//! * [`rules`]: keeps what is worth keeping, drops the noise with a reason,
//!   routes kept events to named queues;
//! * [`queue`]: the durable queue (embedded SQLite by default);
//! * [`worker`]: gathers batches, converts them to rows, writes, retries,
//!   dead-letters, acknowledges: three stages joined by channels;
//! * [`sink`]: Salt's returner tables in SQLite, MySQL/MariaDB or PostgreSQL.
//!
//! [`backfill`] reads the master's job cache back into the same path, for
//! what was published while saltpipe was not connected.
//!
//! [`action`] runs webhooks, mails and commands for chosen events beside the
//! write; [`ops`] serves `/metrics` and `/health` and draws `saltpipe top`.
//!
//! [`pipeline`] wires them for each subcommand; [`config`] reads the TOML;
//! [`stats`] counts everything; [`backoff`] is the one retry schedule. `docs/ARCHITECTURE.md` tells the whole story.

pub mod action;
pub mod backfill;
pub mod backoff;
pub mod bus;
pub mod config;
pub mod event;
pub mod memory;
pub mod msgpack;
pub mod ops;
pub mod outcome;
pub mod pipeline;
pub mod priority;
pub mod queue;
pub mod redact;
pub mod rules;
pub mod sink;
pub mod source;
pub mod stats;
pub mod tls;
pub mod wal;
pub mod web;
pub mod worker;
