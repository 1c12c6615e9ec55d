//! One rustls crypto provider for the whole process.
//!
//! reqwest and lettre both use rustls; if two providers (ring and aws-lc-rs)
//! end up in one binary, rustls cannot pick and panics when a client is
//! built. Installing ring as the process default first avoids that.

/// Installs ring as rustls' default provider (once; later calls do nothing).
pub fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
