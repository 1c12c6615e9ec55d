//! Where the simulator's frames go: a file (what `saltpipe capture` writes,
//! bare or length-prefixed) or a live master's publisher pull socket
//! (`master_event_pull.ipc`, always length-prefixed, as the MWorkers send).
//!
//! The socket is written with plain blocking writes through a bounded
//! buffer: when the master reads slower than we generate, `write` waits, so
//! the generator never holds more than one event and the buffer, and the
//! master is never flooded past what it takes. A write that waits longer
//! than [`STALL`] means the master stopped reading; that is an error, not a
//! silent hang. The rate cap paces events against a wall clock.

use saltpipe::bus::encode::length_prefixed;
use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one write may wait for the master before we give up.
const STALL: Duration = Duration::from_secs(120);
/// Bytes buffered before a write reaches the file or socket.
const BUFFER: usize = 256 * 1024;

pub struct Output {
    w: BufWriter<Box<dyn Write>>,
    prefixed: bool,
    /// Events per second, 0 = as fast as the other end takes them.
    rate: u64,
    started: Option<Instant>,
    pub events: u64,
    pub bytes: u64,
}

impl Output {
    pub fn file(path: &Path, prefixed: bool, rate: u64) -> std::io::Result<Output> {
        let f: Box<dyn Write> = if path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::File::create(path)?)
        };
        Ok(Output::new(f, prefixed, rate))
    }

    pub fn push(socket: &Path, rate: u64) -> std::io::Result<Output> {
        let s = UnixStream::connect(socket).map_err(|e| {
            std::io::Error::new(e.kind(), format!("connect {}: {e}", socket.display()))
        })?;
        s.set_write_timeout(Some(STALL))?;
        Ok(Output::new(Box::new(s), true, rate))
    }

    fn new(w: Box<dyn Write>, prefixed: bool, rate: u64) -> Output {
        Output {
            w: BufWriter::with_capacity(BUFFER, w),
            prefixed,
            rate,
            started: None,
            events: 0,
            bytes: 0,
        }
    }

    /// Writes one frame, waiting for the rate cap and for the other end.
    pub fn put(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.events as f64 / self.rate as f64);
            let now = started.elapsed();
            if due > now + Duration::from_millis(2) {
                // Ahead of the cap: what is buffered goes out before we wait.
                self.w.flush()?;
                std::thread::sleep(due - now);
            }
        }
        if self.prefixed {
            self.w.write_all(&length_prefixed(frame)).map_err(stalled)?;
            self.bytes += frame.len() as u64 + 4;
        } else {
            self.w.write_all(frame).map_err(stalled)?;
            self.bytes += frame.len() as u64;
        }
        self.events += 1;
        Ok(())
    }

    /// Flushes; returns the time from the first event to the last one out.
    pub fn finish(mut self) -> std::io::Result<Duration> {
        self.w.flush().map_err(stalled)?;
        Ok(self.started.map(|s| s.elapsed()).unwrap_or_default())
    }
}

fn stalled(e: std::io::Error) -> std::io::Error {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        std::io::Error::new(
            e.kind(),
            format!("the reader took nothing for {}s: {e}", STALL.as_secs()),
        )
    } else {
        e
    }
}
