//! What an action renders: the template context of an event, and its
//! compiled templates (body, subject, dedupe key).

use super::ActionError;
use crate::event::Event;
use std::sync::Arc;

/// The default body: the whole event.
pub const DEFAULT_BODY: &str = "{{ event | tojson }}";

/// An event offered to an action, with its template context.
#[derive(Debug, Clone)]
pub struct Job {
    /// Events with the same key are sent in order: the minion id, or the
    /// event's partition key.
    pub key: String,
    /// The template context: `tag`, `kind`, `jid`, `minion`, `fun`, `funs`,
    /// `success`, `retcode`, `data` (the full data map), `event` (all of these).
    pub context: Arc<serde_json::Value>,
}

/// An action's templates, compiled once (when the config is checked).
///
/// A JSON body (a webhook whose content type is JSON) is auto-escaped as
/// JSON: `{{ minion }}` renders as a JSON string, so a minion id or return
/// holding `", "admin": true, "x": "` stays one value and cannot add keys.
/// `| tojson` output is already JSON and is left as it is; a value wrongly
/// put inside quotes (`"{{ minion }}"`) renders invalid JSON, which the
/// webhook refuses to send.
#[derive(Debug)]
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    /// Compiles `(name, source)` pairs; the error names the template.
    pub fn new(sources: &[(&'static str, String)]) -> Result<Templates, String> {
        Templates::with_json_body(sources, false)
    }

    /// Like [`Templates::new`]; with `json_body`, the `body` template
    /// auto-escapes every value as JSON.
    pub fn with_json_body(
        sources: &[(&'static str, String)],
        json_body: bool,
    ) -> Result<Templates, String> {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(move |name| {
            if json_body && name == "body" {
                minijinja::AutoEscape::Json
            } else {
                minijinja::AutoEscape::None
            }
        });
        for (name, src) in sources {
            env.add_template_owned(*name, src.clone())
                .map_err(|e| format!("{name} template: {e}"))?;
        }
        Ok(Templates { env })
    }

    /// Renders one template; a rendering error is permanent for this event.
    pub fn render(&self, name: &str, ctx: &serde_json::Value) -> Result<String, ActionError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| ActionError::Permanent(format!("{name} template: {e}")))?;
        t.render(minijinja::Value::from_serialize(ctx))
            .map_err(|e| ActionError::Permanent(format!("{name} template: {e}")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }
}

/// The most JSON of an event's data put into a template context: a larger
/// event, or one nested deeper than serde_json reads (128 levels; the
/// transcode allows 256), gets `data: null` (its fields are still there).
const CONTEXT_MAX_JSON: usize = 16 << 20;

/// The template context of one event.
pub fn context(e: &Event) -> serde_json::Value {
    let data = crate::msgpack::to_json(e.data(), CONTEXT_MAX_JSON)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let f = &e.fields;
    let fields = serde_json::json!({
        "tag": e.tag(),
        "kind": e.kind.as_str(),
        "jid": f.jid,
        "minion": f.minion,
        "fun": f.fun.join(","),
        "funs": f.fun,
        "success": f.success,
        "retcode": f.retcode,
        "outcome": crate::outcome::of_event(e).map(|o| o.as_str()),
        "data": data,
    });
    let mut top = fields.clone();
    if let serde_json::Value::Object(m) = &mut top {
        m.insert("event".into(), fields);
    }
    top
}
