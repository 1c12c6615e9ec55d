//! Outcomes end to end against a real salt-master 3008.5 with two minions:
//! `saltpipe run` into SQLite with a short return window and two exec
//! actions (one for `outcome = "failed"`, one for `outcome = "no_return"`).
//!
//! * a state run with failing states is `failed` with its state counts,
//!   and the failed action fires once for it;
//! * a `test=True` run with pending changes (Salt: retcode 0, success
//!   true, `result: None`) is `changed`, not failed;
//! * a stopped minion (SIGSTOP of its process group: it keeps the job the
//!   master published, unread) gets a `no_return` row once the window
//!   closes, and the no_return action fires once; started again (SIGCONT)
//!   it runs the job, and its late return replaces the `no_return` row.

mod common;

use common::{Saltpipe, Sandbox, count, open_db, wait_for, write_config};
use rusqlite::params;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// (outcome, states_total, states_failed, states_changed).
type Row = (String, Option<i64>, Option<i64>, Option<i64>);

/// The `saltpipe_outcomes` row of (jid, minion).
fn outcome(db: &rusqlite::Connection, jid: &str, minion: &str) -> Option<Row> {
    db.query_row(
        "SELECT outcome, states_total, states_failed, states_changed FROM saltpipe_outcomes \
         WHERE jid = ?1 AND minion = ?2",
        params![jid, minion],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .ok()
}

/// The events an exec action wrote, one file each, as JSON.
fn fired(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|s| serde_json::from_str(&s).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn exec_action(name: &str, when: &str, out: &Path) -> String {
    std::fs::create_dir_all(out).expect("mkdir");
    format!(
        "[[actions]]\nname = \"{name}\"\nwhen = {when}\n\
         exec = {{ command = [\"sh\", \"-c\", \"cat > \\\"$(mktemp \\\"$OUT/ev.XXXXXX\\\")\\\"\"], env = {{ OUT = \"{}\" }} }}\n",
        out.display()
    )
}

/// SIGSTOP / SIGCONT to a sandbox daemon's process group (started with setsid).
fn signal_group(pid: i64, sig: i32) {
    // SAFETY: kill(2) on the process group of a daemon this test started.
    let rc = unsafe { libc::kill(-(pid as i32), sig) };
    assert_eq!(rc, 0, "kill(-{pid}, {sig})");
}

#[test]
fn real_outcomes_silent_minions_and_late_returns() {
    let sb = Sandbox::up(2);
    let work = tempfile::tempdir().expect("tempdir");
    let failed_dir = work.path().join("failed");
    let silent_dir = work.path().join("silent");
    let extra = format!(
        "{}{}",
        exec_action(
            "failed-states",
            "{ outcome = \"failed\", fun = \"state.*\" }",
            &failed_dir
        ),
        exec_action("silent", "{ outcome = \"no_return\" }", &silent_dir),
    );
    let cfg = write_config(work.path(), &sb.event_pub(), &extra);
    // The window: a short one for the test (the default is 5m).
    let text = std::fs::read_to_string(&cfg).expect("config");
    let text = text.replace("[worker]\n", "[worker]\nreturn_window = \"4s\"\n");
    std::fs::write(&cfg, text).expect("config");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);

    let (failing, _) = sb.salt(&["minion-1", "state.apply", "failing"]);
    let (dry, _) = sb.salt(&["minion-1", "state.apply", "failing", "test=True"]);
    let (ping, _) = sb.salt(&["*", "test.ping"]);
    let db = open_db(work.path());
    wait_for("three outcomes", LONG, || {
        (count(&db, "SELECT count(*) FROM saltpipe_outcomes") >= 4).then_some(())
    });
    // failing.sls: `true`, `exit 1` and a file under /proc: two states
    // fail; the two commands ran, so both have changes (pid, retcode).
    assert_eq!(
        outcome(&db, &failing, "minion-1"),
        Some(("failed".into(), Some(3), Some(2), Some(2)))
    );
    // test=True: Salt says retcode 0, success true; every state is
    // `result: None` with the changes it would make.
    let full: String = db
        .query_row(
            "SELECT full_ret FROM salt_returns WHERE jid = ?1",
            [&dry],
            |r| r.get(0),
        )
        .expect("dry run row");
    let full: serde_json::Value = serde_json::from_str(&full).expect("json");
    assert_eq!(
        (full["retcode"].as_i64(), full["success"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(
        outcome(&db, &dry, "minion-1"),
        Some(("changed".into(), Some(3), Some(0), Some(3)))
    );
    assert_eq!(
        outcome(&db, &ping, "minion-2").map(|o| o.0),
        Some("ok".into())
    );

    // The failed action fired, once, for the failing run only.
    wait_for("the failed action", LONG, || {
        (!fired(&failed_dir).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let events = fired(&failed_dir);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["jid"], failing.as_str());

    // minion-2 stops (its whole process group), a job is published to it.
    let pid = sb.info["minions"]["minion-2"]["pid"]
        .as_i64()
        .expect("minion-2 pid");
    signal_group(pid, libc::SIGSTOP);
    let slow = sb.salt_async(&["minion-2", "test.echo", "late"]);
    wait_for("the no_return row", LONG, || {
        outcome(&db, &slow, "minion-2").filter(|o| o.0 == "no_return")
    });
    wait_for("the no_return action", LONG, || {
        (!fired(&silent_dir).is_empty()).then_some(())
    });
    // Started again: it reads the job it was sent and answers late.
    signal_group(pid, libc::SIGCONT);
    wait_for("the late return to replace no_return", LONG, || {
        outcome(&db, &slow, "minion-2").filter(|o| o.0 == "ok")
    });
    let late: String = db
        .query_row(
            r#"SELECT "return" FROM salt_returns WHERE jid = ?1 AND id = 'minion-2'"#,
            [&slow],
            |r| r.get(0),
        )
        .expect("late return row");
    assert_eq!(late, "\"late\"");
    let silent = fired(&silent_dir);
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0]["jid"], slow.as_str());
    assert_eq!(silent[0]["minion"], "minion-2");
    assert_eq!(silent[0]["outcome"], "no_return");
    // Everyone else returned: no other no_return row.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM saltpipe_outcomes WHERE outcome = 'no_return'"
        ),
        0
    );
    assert!(sp.terminate().success());
}
