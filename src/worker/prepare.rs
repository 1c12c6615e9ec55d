//! The prepare stage: the CPU half of a batch, done while the write stage
//! writes the batch before it.
//!
//! Decoding, the conversion into rows (mostly the msgpack to JSON
//! transcode) and `[sink] redact` run on a thread of their own: they are
//! pure CPU, tens of milliseconds for a full batch, and on a runtime thread
//! they would hold up the tasks that drive the database's sockets and the
//! acks.
//!
//! Why a thread of its own, at a lower CPU priority (nice +[`NICE`]), and
//! not the blocking pool: the conversion is the one large piece of
//! saltpipe's work that can wait. Its batches are already in the durable
//! queue. The bus reader and the queue's writer cannot wait: if they fall
//! behind a burst for long enough, the listener's memory part fills and
//! events are dropped (docs/SCALE.md). On a master the master's own
//! processes cannot wait either. When the cores are short, the kernel now
//! gives the conversion what is left instead of an equal share; when they
//! are not, nothing changes. The blocking pool could not be used for this:
//! its threads also run the bus reader and the queue's writer, and a
//! thread's nice value cannot be lowered again without privileges.

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

/// How much lower the conversion thread's CPU priority is than the rest of
/// saltpipe (a nice value; the kernel's weight for +5 is a third of 0's).
pub const NICE: i32 = 5;

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

/// What the blocking half hands back: the records, and the deliveries that
/// did not decode (with the reason).
type Decoded = (Vec<Record>, Vec<(Delivery, String)>);

impl Prepare {
    pub async fn run(mut self) -> Result<(), WorkerError> {
        let converter = Converter::start(self.store.clone(), self.redact.clone())?;
        loop {
            // Room downstream first: a batch converted with nowhere to go
            // would be one more batch held in memory.
            let Ok(permit) = self.ready.reserve().await else {
                return Ok(());
            };
            let Some(batch) = self.batches.recv().await else {
                return Ok(());
            };
            match self.prepare(&converter, batch).await? {
                Some(ready) => permit.send(ready),
                // Shutdown's deadline came while dead-lettering.
                None => return Ok(()),
            }
        }
    }

    /// Decodes `batch` (dead-lettering what does not decode), offers it to
    /// the actions, and has the sink convert it to rows. None if shutdown's
    /// deadline came while dead-lettering.
    async fn prepare(
        &self,
        converter: &Converter,
        batch: Batch,
    ) -> Result<Option<Ready>, WorkerError> {
        let Batch {
            deliveries: batch,
            mut charge,
        } = batch;
        let ids: Vec<u64> = batch.iter().map(|d| d.id).collect();
        let oldest = batch.iter().map(|d| d.received_ms).min().unwrap_or(0);
        let (records, undecodable) = converter.convert(batch).await?;
        // What the batch holds from now on until its write ends: the events,
        // their rows, and the statements a SQL sink builds from the rows
        // (about the rows' size again). Charged without waiting: the
        // gatherer, not this stage, waits for room (crate::memory).
        charge.resize(held_bytes(&records));
        for (d, e) in undecodable {
            // The queue gave back bytes we did not put there: keep them aside.
            tracing::error!(error = %e, key = %d.key, "undecodable message in the queue; dead-lettering it");
            let error = format!("undecodable queue message: {e}");
            if !self
                .store
                .dead_letter("saltpipe/undecodable", &d.body, &error, &self.stop)
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

/// The conversion thread (see the module docs): batches in, records out.
/// It ends when this is dropped.
struct Converter {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A batch to convert, and where its records go.
type Job = (Vec<Delivery>, std::sync::mpsc::SyncSender<Decoded>);

impl Converter {
    fn start(
        store: Arc<Store>,
        redact: Option<Arc<KeyRedactor>>,
    ) -> Result<Converter, WorkerError> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("saltpipe-prepare".into())
            .spawn(move || {
                lower_priority();
                while let Ok((batch, reply)) = rx.recv() {
                    let _ = reply.send(convert(&store, redact.as_deref(), batch));
                }
            })
            .map_err(|e| fatal(format!("cannot start the conversion thread: {e}")))?;
        Ok(Converter { jobs })
    }

    async fn convert(&self, batch: Vec<Delivery>) -> Result<Decoded, WorkerError> {
        let jobs = self.jobs.clone();
        // Waited for on the blocking pool (a thread that only sleeps until
        // the answer comes), not on a channel: so the runtime knows work is
        // in flight, and tests on paused time do not skip ahead past it.
        tokio::task::spawn_blocking(move || {
            let (reply, decoded) = std::sync::mpsc::sync_channel(1);
            jobs.send((batch, reply)).ok()?;
            // Dropped unanswered only if the conversion panicked.
            decoded.recv().ok()
        })
        .await
        .map_err(WorkerError::join)?
        .ok_or_else(|| fatal("the conversion thread ended".into()))
    }
}

fn fatal(message: String) -> WorkerError {
    WorkerError::Sink(crate::sink::SinkError::Fatal(format!(
        "worker stage ended: {message}"
    )))
}

/// Lowers the calling thread's CPU priority by [`NICE`]. On Linux a nice
/// value is a thread's own (`setpriority(2)`, NOTES); where it cannot be
/// set the thread runs at the process's priority, as before.
fn lower_priority() {
    // SAFETY: getpriority/setpriority only read and set the calling
    // thread's scheduling value; no memory is passed.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + NICE).min(19))
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower the conversion thread's priority"
        );
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
    let mut undecodable = Vec::new();
    for d in batch {
        match Event::from_body(d.body.clone()) {
            Ok(event) => records.push(Record::new(event, d.received_ms)),
            Err(e) => undecodable.push((d, e.to_string())),
        }
    }
    store.sink.prepare(&mut records, redact);
    if let Some(r) = redact {
        let mut hidden = 0;
        for record in records.iter_mut().filter(|record| record.rows.is_none()) {
            if let Some((event, n)) = r.redacted(&record.event) {
                record.event = event;
                hidden += n;
                store.sink.prepare(std::slice::from_mut(record), redact);
            }
        }
        if hidden > 0 {
            store.stats.redacted.fetch_add(hidden, Relaxed);
        }
    }
    (records, undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversion thread yields the CPU to the rest: its nice value is
    /// NICE above the thread that started it, and only its own.
    #[test]
    fn the_conversion_thread_runs_at_a_lower_priority() {
        // SAFETY: reads the calling thread's nice value.
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_priority();
            nice()
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before + NICE).min(19));
        assert_eq!(nice(), before, "only the conversion thread is lowered");
    }
}
