//! The real outcome of a return: `failed`, `changed`, `ok` (or, decided
//! later by the worker, `no_return`), and for state runs how many states
//! ran, failed and changed, and how long they took.
//!
//! Why not just `success` and `retcode`: Salt reports success for runs whose
//! states failed in several well-known cases. `success` only says Salt
//! itself did not break (saltstack/salt#38788); `state.single` of a state
//! that does not exist returns the compile errors as a list of strings with
//! `retcode: 0, success: true` (#33672); orchestrations report `retcode: 0`
//! for failed steps (#28569, #36114, #39917, #55458); a `check_cmd` state
//! passes with the command's non-zero retcode kept. So a state run is judged
//! by its states: any `result: false` fails it, a list of strings where a
//! map of states was expected is a render or compile error, and a
//! `test=True` run (`result: None` with the changes it would make) is not a
//! failure but `changed` (its changes are pending: `fun_args` says `test=True`).
//!
//! Computed from the raw msgpack with the project's walker, without
//! building a tree: a few map walks per return, no allocation beyond the
//! function name, so it runs on every return (in the worker's prepare
//! stage, and in the listener only when a rule asks for `outcome`).
//!
//! Multi-function jobs (`fun` a list; `return`, `retcode`, `success` maps
//! keyed by function): each function's return is judged with its own name;
//! the job failed if any function failed (or any retcode is non-zero, or
//! any success false), changed if any state function changed and none
//! failed, and the state counts are the sums over its state functions.

use crate::event::{Event, Kind};
use crate::msgpack::{self, Item, Reader};

/// Tag prefix of the synthetic events the worker's return-window sweep
/// offers to actions, one per minion recorded as `no_return`:
/// `saltpipe/no_return/<jid>/<minion>`, data `{jid, id, fun, outcome,
/// _stamp}` (`_stamp`: when the job was announced). They are never stored
/// as events: the row is in `saltpipe_outcomes`.
pub const NO_RETURN_TAG: &str = "saltpipe/no_return/";

/// The outcome of an event, for rules and action matchers: judged for a
/// job or runner return, `no_return` for the sweep's synthetic events,
/// None for anything else.
pub fn of_event(e: &Event) -> Option<Outcome> {
    match e.kind {
        Kind::JobReturn | Kind::RunnerReturn | Kind::WheelReturn => {
            Some(of_event_return(e).outcome)
        }
        _ if e.tag().starts_with(NO_RETURN_TAG) => Some(Outcome::NoReturn),
        _ => None,
    }
}

/// The synthetic event for one minion recorded as `no_return` (see
/// [`NO_RETURN_TAG`]). `fun` is as stored (`a,b` for a multi-function job,
/// given back as a list); `stamp` in [`crate::sink::rows::stamp`] form.
pub fn no_return_event(jid: &str, minion: &str, fun: &str, stamp: &str) -> Option<Event> {
    let mut body = format!("{NO_RETURN_TAG}{jid}/{minion}\n\n").into_bytes();
    let b = &mut body;
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(b, 5);
    for (k, v) in [("jid", jid), ("id", minion)] {
        let _ = rmp::encode::write_str(b, k);
        let _ = rmp::encode::write_str(b, v);
    }
    let _ = rmp::encode::write_str(b, "fun");
    if fun.contains(',') {
        let funs: Vec<&str> = fun.split(',').collect();
        let _ = rmp::encode::write_array_len(b, funs.len() as u32);
        for f in funs {
            let _ = rmp::encode::write_str(b, f);
        }
    } else {
        let _ = rmp::encode::write_str(b, fun);
    }
    let _ = rmp::encode::write_str(b, "outcome");
    let _ = rmp::encode::write_str(b, Outcome::NoReturn.as_str());
    let _ = rmp::encode::write_str(b, "_stamp");
    let _ = rmp::encode::write_str(b, &format!("{}+00:00", stamp.replacen(' ', "T", 1)));
    Event::from_body(bytes::Bytes::from(body)).ok()
}

/// What a targeted minion's job came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Returned, and nothing says it failed or changed anything.
    Ok,
    /// A state run that changed something (or would, under `test=True`) and failed nowhere.
    Changed,
    /// `success` false, a non-zero `retcode`, a state with `result: false`,
    /// or a render/compile error.
    Failed,
    /// Targeted by the job's announcement, no return within the window.
    NoReturn,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Changed,
        Outcome::Failed,
        Outcome::NoReturn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Changed => "changed",
            Outcome::Failed => "failed",
            Outcome::NoReturn => "no_return",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// States of a state run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct States {
    pub total: u64,
    /// States with `result: false`.
    pub failed: u64,
    /// States whose `changes` is not empty, failed or not (a failed
    /// `cmd.run` still ran: its changes hold the pid and retcode), and
    /// under `test=True` the pending ones.
    pub changed: u64,
    /// Sum of the states' `duration`, in milliseconds.
    pub duration_ms: f64,
}

impl States {
    fn add(&mut self, o: States) {
        self.total += o.total;
        self.failed += o.failed;
        self.changed += o.changed;
        self.duration_ms += o.duration_ms;
    }
}

/// The outcome of one return, with its state counts for a state run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub outcome: Outcome,
    /// None: not a state run.
    pub states: Option<States>,
}

/// Execution functions whose return is a map of state results (or, on a
/// render/compile error, a list of strings).
const STATE_RUNS: &[&str] = &[
    "state.apply",
    "state.highstate",
    "state.sls",
    "state.sls_id",
    "state.single",
    "state.top",
    "state.template",
    "state.template_str",
    "state.high",
    "state.orchestrate",
    "state.orch",
    "state.pkg",
    "state.request",
    "state.run_request",
    "state.test",
    "runner.state.orchestrate",
    "runner.state.orch",
    "runner.state.orchestrate_single",
    "runner.state.orchestrate_high",
];

/// True for the functions that run states.
pub fn is_state_run(fun: &str) -> bool {
    STATE_RUNS.contains(&fun)
}

/// Judges the data map of a `salt/job/<jid>/ret/<minion>` (or
/// `salt/run/<jid>/ret`) event. Data that is not a map, or a return
/// nothing can be read from, is judged by `success`/`retcode` alone.
pub fn of_return(data: &[u8]) -> Summary {
    let mut fun: Option<&[u8]> = None;
    let mut ret: Option<&[u8]> = None;
    let mut retcode: Option<&[u8]> = None;
    let mut success: Option<&[u8]> = None;
    let _ = msgpack::for_each_entry(data, |k, v| match k {
        b"fun" if fun.is_none() => fun = Some(v),
        b"return" if ret.is_none() => ret = Some(v),
        b"retcode" if retcode.is_none() => retcode = Some(v),
        b"success" if success.is_none() => success = Some(v),
        _ => {}
    });
    of_parts(fun, ret, retcode, success)
}

/// [`of_return`] of a decoded event, from the fields its decoding already
/// found (no second walk over a large `return`).
pub fn of_event_return(e: &Event) -> Summary {
    of_event_return_tallied(e, None)
}

/// [`of_event_return`], given the states the JSON transcoder counted as it
/// wrote the event's `return` ([`crate::msgpack::to_json_with_field`]), so
/// the states of a large highstate are not walked a second time. A tally
/// of another value than this event's `return` is not used.
pub fn of_event_return_tallied(e: &Event, tally: Option<&StatesTally>) -> Summary {
    let ret = e.field_raw("return");
    let known = match (tally, ret) {
        (Some(t), Some(v)) if t.span == Some(span_in(e.data(), v)) => Some(t.finish()),
        _ => None,
    };
    of_parts_known(
        e.field_raw("fun"),
        ret,
        e.field_raw("retcode"),
        e.field_raw("success"),
        known,
    )
}

/// Where `part`, a slice of `whole`, lies in it.
fn span_in(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    start..start.wrapping_add(part.len())
}

/// The judgement, from a return's `fun`, `return`, `retcode` and `success`.
fn of_parts(
    fun: Option<&[u8]>,
    ret: Option<&[u8]>,
    retcode: Option<&[u8]>,
    success: Option<&[u8]>,
) -> Summary {
    of_parts_known(fun, ret, retcode, success, None)
}

/// [`of_parts`], with `known` as [`states_of`] `return` when it is known.
fn of_parts_known(
    fun: Option<&[u8]>,
    ret: Option<&[u8]>,
    retcode: Option<&[u8]>,
    success: Option<&[u8]>,
    known: Option<Option<States>>,
) -> Summary {
    let mut failed = success.is_some_and(any_false) || retcode.is_some_and(any_nonzero);
    let mut states: Option<States> = None;
    let mut changed = false;
    let mut judge = |name: &str, value: Option<&[u8]>, known: Option<Option<States>>| {
        let j = judge_value(name, value, known);
        failed |= j.failed;
        if let Some(s) = j.states {
            changed |= s.changed > 0;
            states.get_or_insert_with(States::default).add(s);
        }
    };
    match fun.map(|f| Reader::new(f).item()) {
        Some(Ok(Item::Array(_))) => {
            // Multi-function: `return` is keyed by function name.
            let r = ret.unwrap_or(&[]);
            let _ = msgpack::for_each_entry(r, |k, v| {
                judge(std::str::from_utf8(k).unwrap_or_default(), Some(v), None)
            });
        }
        Some(Ok(Item::Str(f) | Item::Bin(f))) => {
            judge(std::str::from_utf8(f).unwrap_or_default(), ret, known);
        }
        _ => judge("", ret, known),
    }
    let outcome = if failed {
        Outcome::Failed
    } else if changed {
        Outcome::Changed
    } else {
        Outcome::Ok
    };
    Summary { outcome, states }
}

struct Judged {
    failed: bool,
    states: Option<States>,
}

/// One function's return; `known`, when given, is [`states_of`] it.
fn judge_value(fun: &str, value: Option<&[u8]>, known: Option<Option<States>>) -> Judged {
    let state_run = is_state_run(fun);
    let Some(v) = value else {
        return Judged {
            failed: false,
            states: None,
        };
    };
    match Reader::new(v).item() {
        Ok(Item::Map(_)) => {
            if let Some(s) = known.unwrap_or_else(|| states_of(v)) {
                return Judged {
                    failed: s.failed > 0,
                    states: Some(s),
                };
            }
            // An orchestration from `salt-run`: {"data": {"<id>_master":
            // {states}}, "outputter": "highstate", "retcode": N}.
            let (mut data, mut inner_rc) = (None, None);
            let _ = msgpack::for_each_entry(v, |k, x| match k {
                b"data" => data = Some(x),
                b"retcode" => inner_rc = Some(x),
                _ => {}
            });
            let rc_failed = inner_rc.is_some_and(any_nonzero);
            if let Some(d) = data {
                let mut all = States::default();
                let mut found = false;
                let mut compile_error = false;
                let _ = msgpack::for_each_entry(d, |_, host| {
                    if let Some(s) = states_of(host) {
                        found = true;
                        all.add(s);
                    } else if is_string_list(host) {
                        compile_error = true;
                    }
                });
                if found || compile_error {
                    return Judged {
                        failed: rc_failed || compile_error || all.failed > 0,
                        states: Some(all),
                    };
                }
            }
            Judged {
                failed: state_run && rc_failed,
                states: state_run.then(States::default),
            }
        }
        // A render or compile error: a list of strings where the states
        // were expected.
        Ok(Item::Array(n)) if state_run => Judged {
            failed: n > 0 && is_string_list(v),
            states: Some(States::default()),
        },
        _ => Judged {
            failed: false,
            states: None,
        },
    }
}

/// The counts of a map of state results (`mod_|-id_|-name_|-fun` keys,
/// each a map with `result`), or None if `v` is not one. An empty map is
/// not taken for a state run here (the caller knows by the function).
fn states_of(v: &[u8]) -> Option<States> {
    // One walk: each state's fields are read where they lie, instead of
    // skipping the state whole and then walking it again (a highstate's
    // states are most of a large return).
    let mut r = Reader::new(v);
    let Item::Map(n) = r.item().ok()? else {
        return None;
    };
    let mut t = StatesTally::default();
    for _ in 0..n {
        let key = text_key(&mut r)?;
        if !t.state(key) {
            // Not a text key: not a state, and not counted against the shape.
            r.skip().ok()?;
            if t.broken {
                return None;
            }
            continue;
        }
        let Item::Map(m) = r.item().ok()? else {
            return None;
        };
        for _ in 0..m {
            let key = text_key(&mut r)?;
            t.field(key, r.skip().ok()?);
        }
        t.end_state();
    }
    t.finish()
}

/// The states of a map of state results, counted as something walks it:
/// [`states_of`] here, or the JSON transcoder as it writes a return's
/// `return` (so a large highstate is walked once for its JSON and its
/// outcome). The walker reports each top-level entry's key
/// ([`StatesTally::state`]), and for a state each of its fields with its
/// raw msgpack ([`StatesTally::field`]), then [`StatesTally::end_state`];
/// one definition of what counts, whoever walks.
#[derive(Debug, Clone, Default)]
pub struct StatesTally {
    states: States,
    /// Not a map of state results: a key without `_|-`, a state that is
    /// not a map or has no `result`.
    broken: bool,
    /// The current state's `result` is false (None: no `result` yet).
    failed: Option<bool>,
    changed: bool,
    duration_ms: f64,
    /// Where in its input the tallied value lies, set by the walker that
    /// is not [`states_of`] ([`of_event_return_tallied`] checks it is the
    /// event's `return`).
    pub span: Option<std::ops::Range<usize>>,
}

impl StatesTally {
    /// A top-level entry with this key (None: not text): true if its value
    /// is to be read as a state, field by field, then ended.
    pub fn state(&mut self, key: Option<&[u8]>) -> bool {
        let Some(k) = key else {
            return false;
        };
        // `<module>_|-<id>_|-<name>_|-<function>`, or not a state run.
        if self.broken || memchr::memmem::find(k, b"_|-").is_none() {
            self.broken = true;
            return false;
        }
        self.failed = None;
        self.changed = false;
        self.duration_ms = 0.0;
        true
    }

    /// The value of an entry [`StatesTally::state`] took is not a map.
    pub fn not_a_state(&mut self) {
        self.broken = true;
    }

    /// One field of the current state, with its raw msgpack value. A field
    /// given twice counts as its last.
    pub fn field(&mut self, key: Option<&[u8]>, value: &[u8]) {
        match key {
            Some(b"result") => {
                self.failed = Some(matches!(Reader::new(value).item(), Ok(Item::Bool(false))));
            }
            Some(b"changes") => self.changed = non_empty(value),
            Some(b"duration") => self.duration_ms = number(value),
            _ => {}
        }
    }

    pub fn end_state(&mut self) {
        let Some(failed) = self.failed else {
            self.broken = true;
            return;
        };
        self.states.total += 1;
        self.states.failed += u64::from(failed);
        self.states.changed += u64::from(self.changed);
        self.states.duration_ms += self.duration_ms;
    }

    /// The counts, or None if the value was not a map of state results.
    pub fn finish(&self) -> Option<States> {
        (!self.broken && self.states.total > 0).then_some(self.states)
    }
}

/// Reads a map key: `Some(Some(text))` for a str or bin key, `Some(None)`
/// for any other (skipped whole: a container key must not leave its
/// children behind), `None` if the data ends. Read in place rather than
/// skipped and read again: a highstate has eight keys per state.
fn text_key<'a>(r: &mut Reader<'a>) -> Option<Option<&'a [u8]>> {
    let at = r.clone();
    match r.item().ok()? {
        Item::Str(k) | Item::Bin(k) => Some(Some(k)),
        Item::Map(_) | Item::Array(_) => {
            *r = at;
            r.skip().ok()?;
            Some(None)
        }
        _ => Some(None),
    }
}

/// `changes` that say something: a non-empty map, list or string.
fn non_empty(v: &[u8]) -> bool {
    match Reader::new(v).item() {
        Ok(Item::Map(n) | Item::Array(n)) => n > 0,
        Ok(Item::Str(s) | Item::Bin(s)) => !s.is_empty(),
        Ok(Item::Nil | Item::Bool(false)) => false,
        Ok(_) => true,
        Err(_) => false,
    }
}

/// A state's `duration`: a float of milliseconds (older Salt: `"12.3 ms"`).
fn number(v: &[u8]) -> f64 {
    let n = match Reader::new(v).item() {
        Ok(Item::Float(f)) => f,
        Ok(Item::Int(i)) => i as f64,
        Ok(Item::UInt(u)) => u as f64,
        Ok(Item::Str(s)) => std::str::from_utf8(s)
            .ok()
            .and_then(|t| t.trim().trim_end_matches("ms").trim().parse().ok())
            .unwrap_or(0.0),
        _ => 0.0,
    };
    if n.is_finite() && n >= 0.0 { n } else { 0.0 }
}

fn is_string_list(v: &[u8]) -> bool {
    let mut r = Reader::new(v);
    let Ok(Item::Array(n)) = r.item() else {
        return false;
    };
    (0..n).all(|_| matches!(r.item(), Ok(Item::Str(_) | Item::Bin(_))))
}

/// `success`: false, or a map (multi-function) with any false.
fn any_false(v: &[u8]) -> bool {
    scalar_or_values(v, |i| matches!(i, Item::Bool(false)))
}

/// `retcode`: non-zero, or a map with any non-zero.
fn any_nonzero(v: &[u8]) -> bool {
    scalar_or_values(v, |i| match i {
        Item::Int(n) => n != 0,
        Item::UInt(n) => n != 0,
        _ => false,
    })
}

fn scalar_or_values(v: &[u8], test: impl Fn(Item<'_>) -> bool) -> bool {
    let mut r = Reader::new(v);
    match r.item() {
        Ok(Item::Map(n)) => {
            let mut any = false;
            for _ in 0..n {
                let (Ok(_), Ok(value)) = (r.skip(), r.skip()) else {
                    return any;
                };
                any |= Reader::new(value)
                    .item()
                    .is_ok_and(|i| !matches!(i, Item::Map(_) | Item::Array(_)) && test(i));
            }
            any
        }
        Ok(i) => test(i),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn map(entries: Vec<(&str, V)>) -> V {
        V::Map(entries.into_iter().map(|(k, v)| (V::from(k), v)).collect())
    }

    fn packed(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    fn state(result: V, changes: V, duration: f64) -> V {
        map(vec![
            ("name", V::from("x")),
            ("result", result),
            ("changes", changes),
            ("comment", V::from("c")),
            ("duration", V::F64(duration)),
            ("__run_num__", V::from(0)),
        ])
    }

    fn ret(fun: V, ret: V, retcode: V, success: V) -> Summary {
        let data = packed(&map(vec![
            ("cmd", V::from("_return")),
            ("id", V::from("m1")),
            ("jid", V::from("20261202120000000000")),
            ("fun", fun),
            ("fun_args", V::Array(vec![])),
            ("return", ret),
            ("retcode", retcode),
            ("success", success),
            ("_stamp", V::from("2026-12-02T12:00:00.000000+00:00")),
        ]));
        let s = of_return(&data);
        // Every case here is also judged from the transcoder's count.
        let e = return_event(&data).expect("event");
        assert_eq!(tallied(&e), s);
        s
    }

    /// A minion's return event with `data`.
    fn return_event(data: &[u8]) -> Result<Event, crate::event::DecodeError> {
        let mut body = b"salt/job/20261202120000000000/ret/m1\n\n".to_vec();
        body.extend(data);
        Event::from_body(bytes::Bytes::from(body))
    }

    fn one(fun: &str, r: V, rc: i64, ok: bool) -> Summary {
        ret(V::from(fun), r, V::from(rc), V::from(ok))
    }

    #[test]
    fn plain_functions_follow_success_and_retcode() {
        assert_eq!(
            one("test.ping", V::from(true), 0, true).outcome,
            Outcome::Ok
        );
        assert_eq!(
            one("cmd.run", V::from(""), 3, false).outcome,
            Outcome::Failed
        );
        assert_eq!(
            one("cmd.run", V::from(""), 1, true).outcome,
            Outcome::Failed
        );
        let s = one("cmd.run", V::from("x"), 0, false);
        assert_eq!(s.outcome, Outcome::Failed);
        assert_eq!(s.states, None);
        // A map that only looks a little like states is not a state run.
        let s = one(
            "grains.items",
            map(vec![("os", V::from("Debian"))]),
            0,
            true,
        );
        assert_eq!(
            s,
            Summary {
                outcome: Outcome::Ok,
                states: None
            }
        );
        // A list of strings from a non-state function is just a list.
        let l = V::Array(vec![V::from("a"), V::from("b")]);
        assert_eq!(one("cmd.which_bin", l, 0, true).outcome, Outcome::Ok);
        // salt-call returns have no success.
        let s = of_return(&packed(&map(vec![
            ("fun", V::from("test.ping")),
            ("return", V::from(true)),
            ("retcode", V::from(0)),
        ])));
        assert_eq!(s.outcome, Outcome::Ok);
    }

    #[test]
    fn a_failing_state_fails_the_run_whatever_success_says() {
        let r = map(vec![
            (
                "file_|-motd_|-/etc/motd_|-managed",
                state(V::from(true), map(vec![("diff", V::from("+x"))]), 12.5),
            ),
            (
                "cmd_|-boom_|-/bin/false_|-run",
                state(V::from(false), map(vec![]), 3.25),
            ),
            (
                "test_|-t_|-t_|-nop",
                state(V::from(true), map(vec![]), 0.25),
            ),
        ]);
        let s = one("state.apply", r, 0, true);
        assert_eq!(s.outcome, Outcome::Failed);
        assert_eq!(
            s.states,
            Some(States {
                total: 3,
                failed: 1,
                changed: 1,
                duration_ms: 16.0
            })
        );
    }

    #[test]
    fn check_cmd_keeps_retcode_but_the_states_passed() {
        // velum#402: retcode 1 from check_cmd with every state passing:
        // retcode is what Salt says, and non-zero is failed.
        let r = map(vec![(
            "cmd_|-/bin/false_|-/bin/false_|-run",
            state(V::from(true), map(vec![("retcode", V::from(1))]), 431.146),
        )]);
        assert_eq!(one("state.sls_id", r, 1, true).outcome, Outcome::Failed);
    }

    #[test]
    fn changes_without_failure_are_changed_and_test_mode_is_not_failed() {
        let r = map(vec![(
            "pkg_|-vim_|-vim_|-installed",
            state(
                V::from(true),
                map(vec![("vim", map(vec![("new", V::from("9"))]))]),
                900.0,
            ),
        )]);
        let s = one("state.highstate", r, 0, true);
        assert_eq!(s.outcome, Outcome::Changed);
        assert_eq!(s.states.map(|s| s.changed), Some(1));
        // test=True: result None, the changes it would make.
        let r = map(vec![
            (
                "file_|-f_|-/tmp/f_|-managed",
                state(V::Nil, map(vec![("newfile", V::from("/tmp/f"))]), 2.0),
            ),
            ("test_|-n_|-n_|-nop", state(V::from(true), map(vec![]), 0.0)),
        ]);
        let s = one("state.apply", r, 0, true);
        assert_eq!(s.outcome, Outcome::Changed);
        assert_eq!(
            s.states,
            Some(States {
                total: 2,
                failed: 0,
                changed: 1,
                duration_ms: 2.0
            })
        );
        // No changes at all: ok, with the counts.
        let r = map(vec![(
            "test_|-n_|-n_|-nop",
            state(V::from(true), map(vec![]), 1.0),
        )]);
        let s = one("state.apply", r, 0, true);
        assert_eq!(s.outcome, Outcome::Ok);
        assert_eq!(s.states.map(|s| s.total), Some(1));
    }

    #[test]
    fn a_list_of_strings_from_a_state_run_is_a_compile_error() {
        // saltstack/salt#33672: retcode 0, success true.
        let r = V::Array(vec![V::from("Specified state 'muh.maeh' was not found")]);
        let s = one("state.single", r, 0, true);
        assert_eq!(s.outcome, Outcome::Failed);
        assert_eq!(s.states, Some(States::default()));
        // #38788: a missing sls.
        let r = V::Array(vec![V::from(
            "No matching sls found for 'bad' in env 'base'",
        )]);
        assert_eq!(one("state.sls", r, 1, true).outcome, Outcome::Failed);
        // An empty highstate (nothing in top.sls for this minion): ok.
        assert_eq!(
            one("state.apply", map(vec![]), 0, true).outcome,
            Outcome::Ok
        );
    }

    #[test]
    fn orchestration_steps_are_judged_under_data() {
        // `salt-run state.orchestrate` on 3008: the runner's return nests
        // the master's states under data, with its own retcode.
        let steps = |second: V| {
            map(vec![
                (
                    "data",
                    map(vec![(
                        "master_master",
                        map(vec![
                            (
                                "salt_|-one_|-one_|-state",
                                state(V::from(true), map(vec![]), 100.0),
                            ),
                            ("salt_|-two_|-two_|-function", second),
                        ]),
                    )]),
                ),
                ("outputter", V::from("highstate")),
                ("retcode", V::from(0)),
            ])
        };
        let failing = state(V::from(false), map(vec![]), 50.0);
        let s = ret(
            V::from("runner.state.orchestrate"),
            steps(failing),
            V::from(0),
            V::from(true),
        );
        assert_eq!(s.outcome, Outcome::Failed);
        assert_eq!(
            s.states,
            Some(States {
                total: 2,
                failed: 1,
                changed: 0,
                duration_ms: 150.0
            })
        );
        let fine = state(V::from(true), map(vec![("m1", V::from(true))]), 50.0);
        let s = ret(
            V::from("runner.state.orchestrate"),
            steps(fine),
            V::from(0),
            V::from(true),
        );
        assert_eq!(s.outcome, Outcome::Changed);
        // A render error of the orchestration itself.
        let r = map(vec![
            (
                "data",
                map(vec![(
                    "master_master",
                    V::Array(vec![V::from("Rendering SLS 'base:orch' failed")]),
                )]),
            ),
            ("outputter", V::from("highstate")),
            ("retcode", V::from(1)),
        ]);
        let s = ret(
            V::from("runner.state.orchestrate"),
            r,
            V::from(0),
            V::from(true),
        );
        assert_eq!(s.outcome, Outcome::Failed);
    }

    #[test]
    fn multi_function_jobs_combine_their_functions() {
        let funs = V::Array(vec![V::from("test.ping"), V::from("state.apply")]);
        let states = map(vec![(
            "file_|-f_|-/tmp/f_|-managed",
            state(V::from(true), map(vec![("diff", V::from("new"))]), 5.0),
        )]);
        let rets = map(vec![("test.ping", V::from(true)), ("state.apply", states)]);
        let ok = map(vec![
            ("test.ping", V::from(true)),
            ("state.apply", V::from(true)),
        ]);
        let zero = map(vec![("test.ping", V::from(0)), ("state.apply", V::from(0))]);
        let s = ret(funs.clone(), rets.clone(), zero.clone(), ok.clone());
        assert_eq!(s.outcome, Outcome::Changed);
        assert_eq!(s.states.map(|s| s.total), Some(1));
        let two = map(vec![("test.ping", V::from(0)), ("state.apply", V::from(2))]);
        assert_eq!(
            ret(funs.clone(), rets.clone(), two, ok.clone()).outcome,
            Outcome::Failed
        );
        let bad = map(vec![
            ("test.ping", V::from(false)),
            ("state.apply", V::from(true)),
        ]);
        assert_eq!(
            ret(funs.clone(), rets, zero.clone(), bad).outcome,
            Outcome::Failed
        );
        let err = map(vec![
            ("test.ping", V::from(true)),
            (
                "state.apply",
                V::Array(vec![V::from("Pillar failed to render")]),
            ),
        ]);
        assert_eq!(ret(funs, err, zero, ok).outcome, Outcome::Failed);
    }

    #[test]
    fn odd_values_never_panic_and_fall_back_to_success() {
        assert_eq!(of_return(b"").outcome, Outcome::Ok);
        assert_eq!(of_return(&[0xc1]).outcome, Outcome::Ok);
        assert_eq!(
            one("state.apply", V::from("VALUE_TRIMMED"), 0, true).outcome,
            Outcome::Ok
        );
        assert_eq!(
            one("state.apply", V::from("VALUE_TRIMMED"), 1, true).outcome,
            Outcome::Failed
        );
        // A state whose value is not a map: not a state result.
        let r = map(vec![("a_|-b_|-c_|-d", V::from(1))]);
        assert_eq!(
            one("state.apply", r, 0, true).states,
            Some(States::default())
        );
        // Keys that are not text, beside the states and inside one: skipped
        // whole (a map used as a key leaves no children behind), not states.
        let state = V::Map(vec![
            (V::from(7), V::from("x")),
            (V::Map(vec![(V::from("result"), V::from(true))]), V::Nil),
            (V::from("result"), V::from(false)),
            (V::from("changes"), V::Map(vec![(V::from("k"), V::from(1))])),
        ]);
        let r = V::Map(vec![
            (V::Array(vec![V::from("a_|-b_|-c_|-d")]), V::from(1)),
            (V::from(3), V::Map(vec![])),
            (V::from("pkg_|-p_|-p_|-installed"), state),
        ]);
        let s = one("state.apply", r, 0, true);
        assert_eq!(s.outcome, Outcome::Failed);
        let states = s.states.expect("states");
        assert_eq!((states.total, states.failed, states.changed), (1, 1, 1));
        // Durations as old Salt wrote them, and nonsense.
        assert_eq!(number(&packed(&V::from("12.5 ms"))), 12.5);
        assert_eq!(number(&packed(&V::from("NaN"))), 0.0);
        assert_eq!(number(&packed(&V::F64(-1.0))), 0.0);
    }

    /// The returns of a real Salt 3008.5 bus capture (tests/fixtures):
    /// `cmd.run 'exit 3'` fails by its retcode, `state.apply failing` by its
    /// failing state, the others are ok.
    #[test]
    fn real_returns_from_a_salt_3008_capture() {
        use crate::bus::framing::{Framed, Framer};
        use crate::event::{Event, Kind};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/salt-3008.5-bus.bin"
        );
        let bytes = std::fs::read(path).expect("fixture");
        let mut framer = Framer::new(1 << 20);
        framer.buffer_mut().extend_from_slice(&bytes);
        let mut seen = std::collections::BTreeMap::new();
        while let Some(f) = framer.next_frame() {
            let Framed::Frame(f) = f else { continue };
            let Ok(e) = Event::from_frame(&f) else {
                continue;
            };
            if e.kind != Kind::JobReturn
                || e.fields
                    .fun
                    .first()
                    .is_some_and(|f| f == "saltutil.find_job")
            {
                continue;
            }
            let s = of_return(e.data());
            // The event's own judgement (from the entries its decoding
            // found) is the same as a walk of its data, and so is the one
            // from the states its transcode counted.
            assert_eq!(of_event_return(&e), s);
            assert_eq!(tallied(&e), s);
            let key = format!(
                "{}:{}:{}",
                e.fields.jid.unwrap_or_default(),
                e.fields.fun.join(","),
                e.fields.minion.unwrap_or_default()
            );
            seen.insert(key, (s.outcome, s.states.map(|s| (s.total, s.failed))));
        }
        let get = |k: &str| seen.get(k).copied();
        assert_eq!(
            get("20261125124927280803:test.ping:minion-1"),
            Some((Outcome::Ok, None))
        );
        let (o, st) = get("20261125124947906671:state.apply:minion-1").expect("state run");
        assert_eq!(o, Outcome::Failed);
        let (total, failed) = st.expect("counts");
        assert!(total >= 1 && failed >= 1, "{total} {failed}");
        assert_eq!(
            get("20261125124929460610:cmd.run:minion-1").map(|v| v.0),
            Some(Outcome::Failed)
        );
        assert_eq!(
            get("20261125124931595377:cmd.run:minion-1").map(|v| v.0),
            Some(Outcome::Ok)
        );
        assert_eq!(
            get("20261125124950215311:test.ping,test.echo:minion-1").map(|v| v.0),
            Some(Outcome::Ok)
        );
    }

    #[test]
    fn events_have_outcomes_and_no_return_events_say_so() {
        let e = no_return_event(
            "20261202120000000001",
            "m2",
            "state.apply,test.ping",
            "2026-12-02 12:00:00.000001",
        )
        .expect("event");
        assert_eq!(e.tag(), "saltpipe/no_return/20261202120000000001/m2");
        assert_eq!(e.fields.minion.as_deref(), Some("m2"));
        assert_eq!(e.fields.jid.as_deref(), Some("20261202120000000001"));
        assert_eq!(e.fields.fun, vec!["state.apply", "test.ping"]);
        assert_eq!(of_event(&e), Some(Outcome::NoReturn));
        let json = crate::msgpack::to_json(e.data(), usize::MAX).expect("json");
        assert!(
            json.contains("\"_stamp\": \"2026-12-02T12:00:00.000001+00:00\""),
            "{json}"
        );
        let data = packed(&map(vec![
            ("id", V::from("m1")),
            ("fun", V::from("cmd.run")),
            ("retcode", V::from(1)),
        ]));
        let mut body = b"salt/job/1/ret/m1\n\n".to_vec();
        body.extend(&data);
        let ret = Event::from_body(bytes::Bytes::from(body)).expect("event");
        assert_eq!(of_event(&ret), Some(Outcome::Failed));
        let mut body = b"salt/job/1/new\n\n".to_vec();
        body.extend(&data);
        let new = Event::from_body(bytes::Bytes::from(body)).expect("event");
        assert_eq!(of_event(&new), None);
    }

    /// The judgement from the states the transcoder counted as it wrote
    /// `return` (checking it did count them, when there is a `return`).
    fn tallied(e: &Event) -> Summary {
        let mut t = StatesTally::default();
        let _ =
            crate::msgpack::to_json_with_field(e.data(), "return", usize::MAX, None, Some(&mut t));
        assert_eq!(
            t.span.is_some(),
            e.field_raw("return").is_some()
                && crate::msgpack::to_json(e.data(), usize::MAX).is_ok(),
        );
        of_event_return_tallied(e, Some(&t))
    }

    /// Returns shaped like state runs, and like everything close to one:
    /// keys with and without `_|-`, states that are not maps or lack
    /// `result`, fields given twice, durations as text, non-text keys.
    fn return_value() -> impl proptest::strategy::Strategy<Value = V> {
        use proptest::prelude::*;
        let scalar = prop_oneof![
            any::<bool>().prop_map(V::from),
            Just(V::Nil),
            (0u32..5000).prop_map(|n| V::F64(f64::from(n) / 7.0)),
            (-2i64..3).prop_map(V::from),
            prop::sample::select(vec!["", "12.5 ms", "x"]).prop_map(V::from),
            Just(V::Map(vec![])),
            Just(map(vec![("diff", V::from("+1"))])),
        ];
        let field = (
            prop_oneof![
                prop::sample::select(vec!["result", "changes", "duration", "comment", "name"])
                    .prop_map(V::from),
                (0u8..3).prop_map(V::from),
            ],
            scalar.clone(),
        );
        let state_value = prop_oneof![
            8 => prop::collection::vec(field, 0..6).prop_map(V::Map),
            1 => scalar.clone(),
        ];
        let key = prop_oneof![
            8 => (0u8..50).prop_map(|i| V::from(format!("file_|-s{i}_|-/etc/{i}_|-managed"))),
            1 => Just(V::from("data")),
            1 => (0u8..3).prop_map(V::from),
        ];
        prop_oneof![
            6 => prop::collection::vec((key, state_value), 0..6).prop_map(V::Map),
            1 => prop::collection::vec(scalar.clone(), 0..3).prop_map(V::Array),
            1 => scalar,
        ]
    }

    proptest::proptest! {
        /// The transcoder's count of the states (what the worker uses)
        /// judges every return as the outcome's own walk does.
        #[test]
        fn states_counted_while_transcoding_judge_as_the_walk_does(
            fun in proptest::sample::select(vec!["state.apply", "test.ping", "state.sls"]),
            r in return_value(),
            rc in 0i64..3,
            ok: bool,
        ) {
            let data = packed(&map(vec![
                ("id", V::from("m1")),
                ("fun", V::from(fun)),
                ("return", r),
                ("retcode", V::from(rc)),
                ("success", V::from(ok)),
            ]));
            let e = return_event(&data).expect("event");
            proptest::prop_assert_eq!(tallied(&e), of_return(&data));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let s = of_return(&data);
            // An event with that data judges it the same from its entries.
            if let Ok(e) = return_event(&data) {
                proptest::prop_assert_eq!(of_event_return(&e), s);
            }
        }
    }
}
