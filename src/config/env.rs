//! `SALTPIPE_<SECTION>_<KEY>` environment overrides.
//!
//! A value is read as a TOML value when it parses as one (`500`, `true`,
//! `["a", "b"]`) and as a plain string otherwise, so URLs and passwords need
//! no quoting. Only the top-level keys of each section can be set this way;
//! lists of tables (`[[rules.rule]]`) belong in the file.

use super::ConfigError;

/// Sections that can be overridden.
const SECTIONS: &[&str] = &[
    "source", "rules", "queue", "worker", "sink", "log", "metrics", "backfill", "memory",
];

/// Variables that are not overrides even though they start with the prefix.
const NOT_OVERRIDES: &[&str] = &["SALTPIPE_CONFIG"];

/// The process's `SALTPIPE_*` variables.
pub fn from_process() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("SALTPIPE_") && !NOT_OVERRIDES.contains(&k.as_str()))
        .collect()
}

/// Splits `SALTPIPE_SINK_URL` into (`sink`, `url`).
fn split(var: &str) -> Option<(&'static str, String)> {
    let rest = var.strip_prefix("SALTPIPE_")?.to_ascii_lowercase();
    for s in SECTIONS {
        if let Some(key) = rest.strip_prefix(s).and_then(|k| k.strip_prefix('_'))
            && !key.is_empty()
        {
            return Some((s, key.to_owned()));
        }
    }
    None
}

/// Keys whose value is always taken as written, never as a TOML value: a
/// password of digits (`SALTPIPE_SINK_PASSWORD=12345`) is still a password.
fn is_text_key(key: &str) -> bool {
    ["password", "url", "token", "secret"]
        .iter()
        .any(|k| key == *k || key.ends_with(&format!("_{k}")))
}

fn value_of(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// Writes the overrides into `table` and returns the names of the variables applied.
pub fn apply(
    table: &mut toml::Table,
    vars: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    for (var, raw) in vars {
        // Other tools share the prefix (the test harness's SALTPIPE_SALT_VENV):
        // a variable naming no section is not ours, and is left alone.
        let Some((section, key)) = split(var) else {
            continue;
        };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(t) = entry.as_table_mut() else {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: format!("[{section}] is not a table in the file"),
            });
        };
        let value = match value_of(raw) {
            // A quoted value is still unquoted, as before.
            v @ toml::Value::String(_) => v,
            _ if is_text_key(&key) => toml::Value::String(raw.clone()),
            v => v,
        };
        t.insert(key, value);
        applied.push(var.clone());
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_types() {
        assert_eq!(split("SALTPIPE_SINK_URL"), Some(("sink", "url".into())));
        assert_eq!(
            split("SALTPIPE_WORKER_BATCH_MAX_EVENTS"),
            Some(("worker", "batch_max_events".into()))
        );
        assert_eq!(split("SALTPIPE_NOPE_X"), None);
        assert_eq!(split("SALTPIPE_SINK_"), None);
        assert_eq!(value_of("500"), toml::Value::Integer(500));
        assert_eq!(value_of("true"), toml::Value::Boolean(true));
        assert_eq!(
            value_of("mysql://u:p@h/db"),
            toml::Value::String("mysql://u:p@h/db".into())
        );
    }

    #[test]
    fn a_password_of_digits_stays_a_string() {
        let mut t = toml::Table::new();
        apply(
            &mut t,
            &[
                ("SALTPIPE_SINK_PASSWORD".into(), "12345".into()),
                ("SALTPIPE_SINK_POOL_SIZE".into(), "7".into()),
                ("SALTPIPE_QUEUE_URL".into(), "\"redis://h:6379\"".into()),
            ],
        )
        .expect("applied");
        let sink = t["sink"].as_table().expect("table");
        assert_eq!(sink["password"], toml::Value::String("12345".into()));
        assert_eq!(sink["pool_size"], toml::Value::Integer(7));
        assert_eq!(
            t["queue"]["url"],
            toml::Value::String("redis://h:6379".into()),
            "quotes are still taken off"
        );
    }

    #[test]
    fn variables_of_other_tools_are_left_alone() {
        let mut t = toml::Table::new();
        let applied = apply(&mut t, &[("SALTPIPE_BOGUS_X".into(), "1".into())]).expect("ignored");
        assert!(applied.is_empty());
        assert!(t.is_empty());
    }
}
