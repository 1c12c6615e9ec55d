//! What the JSON-producing fuzz targets share.

/// Panics unless `s` is one valid JSON value, at any depth (our JSON nests
/// up to `msgpack::MAX_DEPTH` levels; serde_json's default reader stops at
/// 128).
pub fn assert_json(s: &str) {
    use serde::Deserialize as _;
    let mut de = serde_json::Deserializer::from_str(s);
    de.disable_recursion_limit();
    serde::de::IgnoredAny::deserialize(&mut de).expect("valid JSON");
    de.end().expect("one JSON value");
}
