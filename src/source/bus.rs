//! The live event bus: connect, read without pause, reconnect with backoff.
//!
//! A subscriber sends nothing; it only reads. When the master restarts the
//! socket goes away and comes back: we retry with jittered exponential
//! backoff, and count every disconnect, since whatever was published while
//! we were away is gone for good.

use super::{BusAddress, Ingest, Source, SourceConfig, SourceError, now_ms};
use crate::stats::events;
use async_trait::async_trait;
use rand::Rng;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// Read size: big enough to take a burst of events per syscall.
const READ_CHUNK: usize = 256 * 1024;

pub struct BusSource {
    address: BusAddress,
    reconnect_min: Duration,
    reconnect_max: Duration,
    read_coalesce: Duration,
}

type Stream = Box<dyn AsyncRead + Send + Unpin>;

impl BusSource {
    pub fn new(cfg: &SourceConfig) -> BusSource {
        BusSource {
            address: cfg.address(),
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            read_coalesce: cfg.read_coalesce,
        }
    }

    async fn connect(&self) -> std::io::Result<Stream> {
        Ok(match &self.address {
            BusAddress::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            BusAddress::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }

    /// Reads one connection until it ends or shutdown. Ok(true) on shutdown.
    async fn read_until_closed(
        &self,
        mut stream: Stream,
        ingest: &mut Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(bool, Option<String>), SourceError> {
        loop {
            if ingest.buffer_mut().capacity() - ingest.buffer_mut().len() < READ_CHUNK / 4 {
                ingest.buffer_mut().reserve(READ_CHUNK);
            }
            let backlog = ingest.has_backlog();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok((true, None)),
                r = stream.read_buf(ingest.buffer_mut()) => match r {
                    Ok(0) => return Ok((false, None)),
                    Ok(n) => {
                        ingest.stats().bytes_read.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        ingest.process(now_ms());
                        ingest.flush_nowait()?;
                        // A short read means events trickle in one write at a
                        // time: pause a moment so the next read takes many at
                        // once, one wake-up instead of dozens. The socket
                        // buffer holds far more than a few ms of events, and
                        // a full read (a busy bus) never pauses.
                        if n < READ_CHUNK / 2 && !self.read_coalesce.is_zero() {
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => return Ok((true, None)),
                                _ = tokio::time::sleep(self.read_coalesce) => {}
                            }
                        }
                    }
                    Err(e) => return Ok((false, Some(e.to_string()))),
                },
                r = ingest_room(backlog), if backlog => { r?; }
            }
            // The select above cannot borrow `ingest` twice; move backlog here.
            if ingest.has_backlog() {
                ingest.flush_nowait()?;
            }
        }
    }
}

/// Wakes the loop now and then while a backlog waits for the queue writer.
async fn ingest_room(backlog: bool) -> Result<(), SourceError> {
    if backlog {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[async_trait]
impl Source for BusSource {
    async fn run(
        &mut self,
        ingest: &mut Ingest,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let address = self.address.to_string();
        let mut delay = self.reconnect_min;
        let mut failures: u64 = 0;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.connect().await {
                Ok(stream) => {
                    events::BusConnected { address: &address }.emit(ingest.stats());
                    failures = 0;
                    delay = self.reconnect_min;
                    let (stopped, error) =
                        self.read_until_closed(stream, ingest, &shutdown).await?;
                    if stopped {
                        break;
                    }
                    let partial = ingest.reset_stream();
                    events::BusDisconnected {
                        address: &address,
                        error: error.as_deref(),
                        partial_bytes: partial,
                    }
                    .emit(ingest.stats());
                }
                Err(e) => {
                    failures += 1;
                    // Loud once, then quiet: a master that is down for an hour
                    // should not fill the log.
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(%address, error = %e, attempts = failures, "cannot connect to the event bus; retrying");
                    }
                }
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            let wait = delay.mul_f64(jitter);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(self.reconnect_max);
        }
        ingest.process(now_ms());
        ingest.flush_wait().await
    }
}

/// Tries to connect to the bus once (for `saltpipe validate`).
pub async fn check(cfg: &SourceConfig) -> std::io::Result<()> {
    let source = BusSource::new(cfg);
    match tokio::time::timeout(Duration::from_secs(3), source.connect()).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer in 3 s",
        )),
    }
}

/// What `capture` wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Captured {
    pub bytes: u64,
    pub frames: u64,
}

/// Copies the raw bus stream to `out` until shutdown, EOF or `count` frames.
/// Frames are counted with the same framer the pipeline uses, so a capture
/// that stops at `count` ends on a frame boundary.
pub async fn capture(
    cfg: &SourceConfig,
    out: &std::path::Path,
    count: Option<u64>,
    shutdown: CancellationToken,
) -> std::io::Result<Captured> {
    use crate::bus::framing::{Framed, Framer};
    use tokio::io::AsyncWriteExt;
    let source = BusSource::new(cfg);
    let mut stream = source.connect().await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot connect to the bus at {}: {e}", source.address),
        )
    })?;
    let mut file = tokio::io::BufWriter::new(tokio::fs::File::create(out).await?);
    let mut framer = Framer::new(cfg.max_frame as usize);
    let mut done = Captured::default();
    let mut buf = vec![0u8; READ_CHUNK];
    // Bytes of the stream read so far; `framer.buffered()` of them are not
    // yet part of a complete frame.
    let mut total: u64 = 0;
    'read: loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = stream.read(&mut buf) => r?,
        };
        if n == 0 {
            break;
        }
        let start = total;
        total += n as u64;
        framer.buffer_mut().extend_from_slice(&buf[..n]);
        while let Some(item) = framer.next_frame() {
            if matches!(item, Framed::Frame(_)) {
                done.frames += 1;
                if count.is_some_and(|c| done.frames >= c) {
                    // Stop exactly at the end of this frame.
                    let end = (total - framer.buffered() as u64 - start) as usize;
                    file.write_all(&buf[..end]).await?;
                    done.bytes += end as u64;
                    break 'read;
                }
            }
        }
        file.write_all(&buf[..n]).await?;
        done.bytes += n as u64;
    }
    file.flush().await?;
    Ok(done)
}
