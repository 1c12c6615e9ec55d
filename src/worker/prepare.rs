//! The prepare stage: the CPU half of a batch, done while the write stage
//! writes the batch before it.
//!
//! Decoding, the conversion into rows (mostly the msgpack to JSON
//! transcode) and `[sink] redact` run on the blocking pool: they are pure CPU,
//! tens of milliseconds for a full batch, and on a runtime thread they would
//! hold up the tasks that drive the database's sockets and the acks.

use super::write::Store;
use super::{Batch, Stop, WorkerError};
use crate::action::Actions;
use crate::event::Event;
use crate::queue::Delivery;
use crate::redact::KeyRedactor;
use crate::sink::Record;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;

/// A batch decoded and converted, waiting for its write.
pub(super) struct Ready {
    /// Every delivery's id, the dead-lettered ones too: all are acked
    /// once the rest is written.
    pub ids: Vec<u64>,
    /// Receive time of the batch's oldest event.
    pub oldest: i64,
    pub records: Vec<Record>,
    /// The worker memory this batch holds: its events and their rows.
    pub charge: crate::memory::Charge,
}

pub(super) struct Prepare {
    pub store: Arc<Store>,
    /// Offered each batch before its insert, never waited for.
    pub actions: Option<Actions>,
    pub redact: Option<Arc<KeyRedactor>>,
    pub stop: Stop,
    /// From the gather stage.
    pub batches: mpsc::Receiver<Batch>,
    /// To the write stage.
    pub ready: mpsc::Sender<Ready>,
}

/// What the blocking half hands back: the records, and what is kept
/// aside as dead letters instead.
struct Decoded {
    records: Vec<Record>,
    refused: Vec<Refused>,
}

/// A dead letter to write: its tag, the bytes kept, and why.
struct Refused {
    tag: String,
    body: bytes::Bytes,
    error: String,
}

impl Prepare {
    pub async fn run(mut self) -> Result<(), WorkerError> {
        loop {
            // Room downstream first: a batch converted with nowhere to go
            // would be one more batch held in memory.
            let Ok(permit) = self.ready.reserve().await else {
                return Ok(());
            };
            let Some(batch) = self.batches.recv().await else {
                return Ok(());
            };
            match self.prepare(batch).await? {
                Some(ready) => permit.send(ready),
                // Shutdown's deadline came while dead-lettering.
                None => return Ok(()),
            }
        }
    }

    /// Decodes `batch` (dead-lettering what does not decode), offers it to
    /// the actions, and has the sink convert it to rows. None if shutdown's
    /// deadline came while dead-lettering.
    async fn prepare(&self, batch: Batch) -> Result<Option<Ready>, WorkerError> {
        let Batch {
            deliveries: batch,
            mut charge,
        } = batch;
        let ids: Vec<u64> = batch.iter().map(|d| d.id).collect();
        let oldest = batch.iter().map(|d| d.received_ms).min().unwrap_or(0);
        let store = self.store.clone();
        let redact = self.redact.clone();
        let Decoded { records, refused } =
            tokio::task::spawn_blocking(move || convert(&store, redact.as_deref(), batch))
                .await
                .map_err(WorkerError::join)?;
        // What the batch holds from now on until its write ends: the events,
        // their rows, and the statements a SQL sink builds from the rows
        // (about the rows' size again). Charged without waiting: the
        // gatherer, not this stage, waits for room (crate::memory).
        charge.resize(held_bytes(&records));
        for r in refused {
            if !self
                .store
                .dead_letter(&r.tag, &r.body, &r.error, &self.stop)
                .await?
            {
                return Ok(None);
            }
        }
        if let Some(actions) = &self.actions {
            // Before the insert, as the original project did, but only a
            // hand-off: a slow or full action never delays the write.
            actions.current().offer(records.iter().map(|r| &r.event));
        }
        Ok(Some(Ready {
            ids,
            oldest,
            records,
            charge,
        }))
    }
}

/// The bytes a converted batch holds while it is written: each event's
/// body, and twice its rows (the rows, and the SQL statement built from
/// them).
fn held_bytes(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| r.event.body.len() + 2 * r.rows.as_ref().map_or(0, |rows| rows.heap_bytes()))
        .sum()
}

/// The blocking half: decode, convert to rows, redact.
///
/// Why rows before redaction: the sink's conversion checks every key
/// against `[sink] redact` as it transcodes ([`crate::sink::Sink::prepare`]),
/// so a record it converted holds nothing to hide and is not walked a
/// second time. Only the records it left (a key to hide, too large, or a
/// sink not connected yet) are walked here, redacted when they need it,
/// and converted again.
fn convert(store: &Store, redact: Option<&KeyRedactor>, batch: Vec<Delivery>) -> Decoded {
    let mut records = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for d in batch {
        match Event::from_body(d.body.clone()) {
            Ok(event) => records.push(Record::new(event, d.received_ms)),
            Err(e) => {
                // The queue gave back bytes we did not put there: keep them aside.
                crate::log_limited!(error, error = %e, key = %d.key, "undecodable message in the queue; dead-lettering it");
                refused.push(Refused {
                    tag: "saltpipe/undecodable".to_owned(),
                    body: d.body,
                    error: format!("undecodable queue message: {e}"),
                });
            }
        }
    }
    store.sink.prepare(&mut records, redact);
    if let Some(r) = redact {
        let mut hidden = 0;
        records.retain_mut(|record| {
            if record.rows.is_some() {
                return true;
            }
            match r.redacted(&record.event) {
                Ok(Some((event, n))) => {
                    record.event = event;
                    hidden += n;
                    store.sink.prepare(std::slice::from_mut(record), redact);
                    true
                }
                Ok(None) => true,
                // Its bytes may hold a value to hide, and the redactor could
                // not walk them all (nested past the limit): they are kept
                // nowhere, not even as a dead letter. Its tag and why are,
                // so it is counted, logged (rate-limited, by the dead
                // letter's event) and can be found.
                Err(e) => {
                    refused.push(Refused {
                        tag: record.event.tag().to_owned(),
                        body: bytes::Bytes::new(),
                        error: format!(
                            "cannot be checked for [sink] redact's keys ({e}); its bytes are not kept"
                        ),
                    });
                    false
                }
            }
        });
        if hidden > 0 {
            store.stats.redacted.fetch_add(hidden, Relaxed);
        }
    }
    Decoded { records, refused }
}
