//! A state run's return laid out like Salt's highstate outputter: one row
//! per state (id, function, name, result, comment, changes, duration),
//! failures first, then in the order the states ran (`__run_num__`).
//!
//! A state return is a map `"<module>_|-<id>_|-<name>_|-<function>"` ->
//! `{result, comment, changes, duration, name, __id__, __run_num__}`.
//! Anything else where a state run was expected (a list of strings: render
//! or compile errors) is given back as `errors`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    pub id: String,
    pub function: String,
    pub name: String,
    /// `true`, `false`, or None (`test=True`: would change).
    pub result: Option<bool>,
    pub comment: String,
    /// Pretty JSON of the changes; empty when there are none.
    pub changes: String,
    pub duration_ms: Option<f64>,
    pub run_num: i64,
}

impl StateRow {
    /// The CSS class and word for the result, like the outputter's colours.
    pub fn class(&self) -> &'static str {
        match self.result {
            Some(false) => "failed",
            None => "changed",
            Some(true) if !self.changes.is_empty() => "changed",
            Some(true) => "ok",
        }
    }

    pub fn result_word(&self) -> &'static str {
        match self.result {
            Some(true) => "True",
            Some(false) => "False",
            None => "None",
        }
    }

    pub fn duration(&self) -> String {
        self.duration_ms
            .map_or_else(String::new, |d| format!("{d:.1} ms"))
    }
}

/// The states of one state return, or the error strings it holds instead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateRun {
    pub states: Vec<StateRow>,
    pub errors: Vec<String>,
}

impl StateRun {
    pub fn failed(&self) -> usize {
        self.states
            .iter()
            .filter(|s| s.result == Some(false))
            .count()
    }
}

/// Parses a return; None when it is not a state run at all.
pub fn parse(ret: &Value) -> Option<StateRun> {
    match ret {
        Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.contains("_|-")) => {
            let mut states: Vec<StateRow> = m
                .iter()
                .map(|(k, v)| {
                    let parts: Vec<&str> = k.split("_|-").collect();
                    let module = parts.first().copied().unwrap_or_default();
                    let function = parts.get(3).copied().unwrap_or_default();
                    let text = |key: &str| match v.get(key) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        Some(Value::Null) | None => String::new(),
                        Some(other) => other.to_string(),
                    };
                    let id = Some(text("__id__"))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| parts.get(1).copied().unwrap_or_default().to_owned());
                    let name = Some(text("name"))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| parts.get(2).copied().unwrap_or_default().to_owned());
                    let changes = match v.get("changes") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::Object(c)) if c.is_empty() => String::new(),
                        Some(c) => serde_json::to_string_pretty(c).unwrap_or_default(),
                    };
                    StateRow {
                        id,
                        function: format!("{module}.{function}"),
                        name,
                        result: v.get("result").and_then(Value::as_bool),
                        comment: text("comment"),
                        changes,
                        duration_ms: v.get("duration").and_then(Value::as_f64),
                        run_num: v
                            .get("__run_num__")
                            .and_then(Value::as_i64)
                            .unwrap_or(i64::MAX),
                    }
                })
                .collect();
            states.sort_by_key(|s| (s.result != Some(false), s.run_num));
            Some(StateRun {
                states,
                errors: Vec::new(),
            })
        }
        Value::Array(a) if a.iter().all(Value::is_string) && !a.is_empty() => Some(StateRun {
            states: Vec::new(),
            errors: a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_first_then_run_order() {
        let ret = serde_json::json!({
            "file_|-motd_|-/etc/motd_|-managed": {"result": true, "comment": "ok", "changes": {"diff": "+x"}, "__run_num__": 0, "duration": 1.5, "name": "/etc/motd", "__id__": "motd"},
            "cmd_|-boom_|-false_|-run": {"result": false, "comment": ["Command failed", "<script>"], "changes": {}, "__run_num__": 2},
            "pkg_|-vim_|-vim_|-installed": {"result": true, "comment": "", "changes": {}, "__run_num__": 1},
        });
        let run = parse(&ret).expect("a state run");
        assert_eq!(run.failed(), 1);
        let ids: Vec<&str> = run.states.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["boom", "motd", "vim"]);
        assert_eq!(run.states[0].function, "cmd.run");
        assert_eq!(run.states[0].comment, "Command failed\n<script>");
        assert_eq!(run.states[1].class(), "changed");
        assert_eq!(run.states[2].class(), "ok");
        assert_eq!(run.states[1].duration(), "1.5 ms");
    }

    #[test]
    fn compile_errors_and_plain_returns() {
        let run = parse(&serde_json::json!(["Rendering SLS failed"])).expect("errors");
        assert_eq!(run.errors, ["Rendering SLS failed"]);
        assert!(parse(&serde_json::json!(true)).is_none());
        assert!(parse(&serde_json::json!({"a": 1})).is_none());
    }
}
