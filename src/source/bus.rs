//! The live event bus: connect, read without pause, reconnect with backoff.
//!
//! A subscriber sends nothing; it only reads. When the master restarts the
//! socket goes away and comes back: we retry with jittered exponential
//! backoff, and count every disconnect, since whatever was published while
//! we were away is gone for good.
//!
//! The reader is a plain thread doing blocking reads, not a task on the
//! async runtime, for the listener's CPU: the master writes every event
//! separately, and a socket registered with the runtime's (edge-triggered)
//! epoll wakes a thread for every one of those writes, even while the reader
//! pauses to let events pile up (`read_coalesce`). Thousands of wake-ups a
//! second were most of `listen`'s CPU at 5,000 events/s. A thread that
//! sleeps, then reads whatever has arrived, wakes once per pause however
//! many events came. It also means no stall of the runtime (a slow queue
//! write, a busy broker client) can ever hold up the bus.

use super::{BusAddress, Ingest, Source, SourceConfig, SourceError, now_ms};
use crate::backoff::Backoff;
use crate::stats::events;
use async_trait::async_trait;
use std::io::Read;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Read size: big enough to take a burst of events per syscall.
const READ_CHUNK: usize = 256 * 1024;
/// Reads smaller than this, ending on a whole frame, are a trickle: the
/// reader pauses `read_coalesce` after them. Larger ones are a busy bus
/// or big events, where a pause would only cap the rate: a pause lets at
/// most the socket's buffer (~200 KB on Linux) through, 20 MB/s at 10 ms,
/// and a highstate's returns come at 100+ MB/s (the master then cuts the
/// reader off once 10,000 events wait for it).
const TRICKLE: usize = 32 * 1024;
/// How long a blocking read waits before the reader looks at shutdown.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// The same while kept events wait for room in the queue writer's channel.
const BACKLOG_RETRY: Duration = Duration::from_millis(5);
/// How long a TCP connect may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct BusSource {
    address: BusAddress,
    reconnect_min: Duration,
    reconnect_max: Duration,
    read_coalesce: Duration,
}

/// A connected bus socket, read with blocking calls.
enum Conn {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(Some(t)),
            Conn::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }
}

type Stream = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

impl BusSource {
    pub fn new(cfg: &SourceConfig) -> BusSource {
        BusSource {
            address: cfg.address(),
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            read_coalesce: cfg.read_coalesce,
        }
    }

    /// An async connection, for `capture` and `validate`.
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

    /// A blocking connection, for the reader thread.
    fn connect_blocking(&self) -> std::io::Result<Conn> {
        Ok(match &self.address {
            BusAddress::Unix(p) => Conn::Unix(std::os::unix::net::UnixStream::connect(p)?),
            BusAddress::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let mut last = None;
                for addr in a.to_socket_addrs()? {
                    match std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => return Ok(Conn::Tcp(s)),
                        Err(e) => last = Some(e),
                    }
                }
                return Err(last.unwrap_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("`{a}` resolves to no address"),
                    )
                }));
            }
        })
    }

    /// Reads one connection until it ends or shutdown. Ok(true) on shutdown.
    fn read_until_closed(
        &self,
        mut conn: Conn,
        ingest: &mut Ingest,
        shutdown: &CancellationToken,
        buf: &mut [u8],
    ) -> Result<(bool, Option<String>), SourceError> {
        let mut timeout = READ_TIMEOUT;
        conn.set_read_timeout(timeout)
            .map_err(|e| SourceError::Bus(e.to_string()))?;
        loop {
            if shutdown.is_cancelled() {
                return Ok((true, None));
            }
            // Retry a waiting backlog often, else look at shutdown now and then.
            let want = if ingest.has_backlog() {
                BACKLOG_RETRY
            } else {
                READ_TIMEOUT
            };
            if want != timeout {
                timeout = want;
                conn.set_read_timeout(timeout)
                    .map_err(|e| SourceError::Bus(e.to_string()))?;
            }
            match conn.read(buf) {
                Ok(0) => return Ok((false, None)),
                Ok(n) => {
                    ingest
                        .stats()
                        .bytes_read
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    ingest.buffer_mut().extend_from_slice(&buf[..n]);
                    ingest.process(now_ms());
                    ingest.flush_nowait()?;
                    // A small read ending on a whole frame means events
                    // trickle in one write at a time: pause a moment so the
                    // next read takes many at once, one wake-up instead of
                    // dozens. A large read, or one that ends inside a frame
                    // (the rest of a big event is on its way), never pauses.
                    if n < TRICKLE
                        && ingest.buffer_mut().is_empty()
                        && !self.read_coalesce.is_zero()
                    {
                        std::thread::sleep(self.read_coalesce);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if ingest.has_backlog() {
                        ingest.flush_nowait()?;
                    }
                }
                Err(e) => return Ok((false, Some(e.to_string()))),
            }
        }
    }

    /// The whole life of the reader: connect, read, reconnect, until shutdown.
    fn run_blocking(
        &self,
        ingest: &mut Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let address = self.address.to_string();
        let mut backoff = Backoff::new(self.reconnect_min, self.reconnect_max);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.connect_blocking() {
                Ok(conn) => {
                    events::BusConnected { address: &address }.emit(ingest.stats());
                    backoff.reset();
                    let (stopped, error) =
                        self.read_until_closed(conn, ingest, shutdown, &mut buf)?;
                    if stopped {
                        break;
                    }
                    let partial = ingest.end_stream(now_ms());
                    events::BusDisconnected {
                        address: &address,
                        error: error.as_deref(),
                        partial_bytes: partial,
                    }
                    .emit(ingest.stats());
                }
                Err(e) => {
                    // Counted below by `fail`; loud once, then quiet: a
                    // master that is down for an hour should not fill the log.
                    let failures = backoff.failures() + 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(%address, error = %e, attempts = failures, "cannot connect to the event bus; retrying");
                    }
                }
            }
            // After a disconnect too (a master restarting closes and
            // refuses for a while): reset only by a successful connect.
            let until = std::time::Instant::now() + backoff.fail();
            // Sleep in steps, so shutdown is seen within a step.
            while !shutdown.is_cancelled() {
                let now = std::time::Instant::now();
                if now >= until {
                    break;
                }
                std::thread::sleep((until - now).min(READ_TIMEOUT));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Source for BusSource {
    async fn run(
        &mut self,
        mut ingest: Ingest,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let me = self.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let r = me.run_blocking(&mut ingest, &shutdown);
            (ingest, r)
        });
        let (mut ingest, result) = reader
            .await
            .map_err(|e| SourceError::Bus(format!("the reader thread failed: {e}")))?;
        result?;
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
