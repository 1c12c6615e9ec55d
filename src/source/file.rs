//! A captured bus stream, read back for `saltpipe replay`.
//!
//! Unlike the bus, a file can wait: this source applies backpressure (it
//! waits for the queue writer) instead of dropping, so a replay keeps every
//! event the rules keep, as fast as the pipeline takes them.

use super::{Ingest, Source, SourceError, now_ms};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: PathBuf) -> FileSource {
        FileSource { path }
    }
}

#[async_trait]
impl Source for FileSource {
    async fn run(
        &mut self,
        mut ingest: Ingest,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let err = |source| SourceError::File {
            path: self.path.clone(),
            source,
        };
        let mut f = tokio::fs::File::open(&self.path).await.map_err(err)?;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            ingest.buffer_mut().reserve(1 << 20);
            let n = f.read_buf(ingest.buffer_mut()).await.map_err(err)?;
            if n == 0 {
                break;
            }
            ingest.stats().bytes_read.fetch_add(n as u64, Relaxed);
            ingest.process(now_ms());
            ingest.flush_wait().await?;
        }
        let leftover = ingest.end_stream(now_ms());
        if leftover > 0 {
            tracing::warn!(
                bytes = leftover,
                "capture ends inside a frame; the partial frame is skipped"
            );
        }
        ingest.flush_wait().await
    }
}
