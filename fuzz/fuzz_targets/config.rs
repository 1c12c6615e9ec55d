//! Config parsing on arbitrary text and environment: a config or an error
//! naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line, if it looks like one, is an environment override.
    let (vars, body) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with("SALTPIPE_") => match first.split_once('=') {
            Some((k, v)) => (vec![(k.to_owned(), v.to_owned())], rest),
            None => (vec![], text),
        },
        _ => (vec![], text),
    };
    if let Ok(cfg) =
        saltpipe::config::from_str_with_env(body, std::path::Path::new("fuzz.toml"), &vars)
    {
        // What loads has been validated.
        assert!(cfg.validate().is_ok());
    }
});
