//! Secrets never reach an output: the real binary is run with passwords in
//! every supported place (URL user info, query, NATS token, webhook path,
//! environment) against the real services on loopback, and its stdout and
//! stderr are searched for them; exec children get a clean environment;
//! webhooks do not follow redirects by default and cannot be injected into;
//! `[sink] redact` hides values in what is stored and what actions get.

mod common;

use axum::response::IntoResponse;
use saltpipe::action::webhook::{Webhook, WebhookConfig};
use saltpipe::action::{Action, ActionError, Job, Templates};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn saltpipe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saltpipe"));
    c.args(args)
        .env_remove("SALTPIPE_CONFIG")
        .env_remove("SALTPIPE_SINK_URL")
        .env_remove("SALTPIPE_QUEUE_URL")
        .env("RUST_LOG", "debug");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run saltpipe")
}

/// stdout and stderr of one run, for searching and for failure messages.
fn all_output(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_hidden(what: &str, text: &str, secret: &str) {
    assert!(
        !text.contains(secret),
        "{what}: the secret {secret:?} was printed:\n{text}"
    );
}

/// (variable, value, the secret in it): each shape of issue 11, each given
/// the way operators give URLs (the environment) and as a file below.
const SHAPES: &[(&str, &str, &str)] = &[
    (
        "SALTPIPE_SINK_URL",
        "postgres://salt:Pw1Unparsable@db:99999/salt",
        "Pw1Unparsable",
    ),
    (
        "SALTPIPE_SINK_URL",
        "mysql://salt:Pw2Unparsable@db:99999/salt",
        "Pw2Unparsable",
    ),
    (
        "SALTPIPE_SINK_URL",
        "postgres://salt@db/salt?password=Pw3Query",
        "Pw3Query",
    ),
    (
        "SALTPIPE_SINK_URL",
        "mysql://salt@db/salt?ssl-mode=REQUIRED&password=Pw4Query",
        "Pw4Query",
    ),
    (
        "SALTPIPE_SINK_URL",
        "postgres://salt:Pw5#Hash@db/salt",
        "Pw5#Hash",
    ),
    (
        "SALTPIPE_SINK_URL",
        "salt:Pw6NoScheme@db/salt",
        "Pw6NoScheme",
    ),
    (
        "SALTPIPE_QUEUE_URL",
        "nats://Tok7Nats@127.0.0.1:4222",
        "Tok7Nats",
    ),
    (
        "SALTPIPE_QUEUE_URL",
        "nats://127.0.0.1:4222?token=Tok8Query",
        "Tok8Query",
    ),
    (
        "SALTPIPE_QUEUE_URL",
        "redis://default:Pw9Redis@127.0.0.1:6379/0",
        "Pw9Redis",
    ),
    (
        "SALTPIPE_QUEUE_URL",
        "redis://:Pw10BadPort@127.0.0.1:99999",
        "Pw10BadPort",
    ),
    (
        "SALTPIPE_QUEUE_URL",
        "amqp://guest:Pw11Amqp@127.0.0.1:5672/%2f",
        "Pw11Amqp",
    ),
    ("SALTPIPE_SINK_PASSWORD", "12345678901", "12345678901"),
];

#[test]
fn validate_never_prints_a_url_secret_from_the_environment() {
    for (var, value, secret) in SHAPES {
        let o = saltpipe(&["validate", "--no-connect"], &[(var, value)]);
        assert_hidden(&format!("{var}={value}"), &all_output(&o), secret);
    }
}

#[test]
fn validate_never_prints_a_url_secret_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    for (var, value, secret) in SHAPES {
        let (section, key) = match *var {
            "SALTPIPE_SINK_URL" => ("sink", "url"),
            "SALTPIPE_QUEUE_URL" => ("queue", "url"),
            _ => ("sink", "password"),
        };
        let v = if key == "password" {
            value.to_string()
        } else {
            format!("\"{value}\"")
        };
        std::fs::write(&p, format!("[{section}]\n{key} = {v}\n")).expect("write");
        let o = saltpipe(
            &[
                "validate",
                "--no-connect",
                "--config",
                p.to_str().expect("utf8"),
            ],
            &[],
        );
        assert_hidden(&format!("{section}.{key} = {v}"), &all_output(&o), secret);
    }
}

/// Webhook URLs carry the secret in the path or the query.
#[test]
fn validate_never_prints_a_webhook_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    for (url, secret) in [
        (
            "https://hooks.slack.com/services/T0SLACK/B0SLACK/SlackSecret1",
            "SlackSecret1",
        ),
        (
            "https://discord.com/api/webhooks/123456/DiscordSecret2",
            "DiscordSecret2",
        ),
        (
            "https://example.webhook.office.com/webhookb2/a@b/IncomingWebhook/TeamsSecret3/d",
            "TeamsSecret3",
        ),
        ("https://h.example/hook?sig=SigSecret4", "SigSecret4"),
        // Refused by validate (not http): the message must not show it either.
        ("ftp://u:FtpSecret5@h/x", "FtpSecret5"),
        ("https://u:BasicSecret6@h:99999/x", "BasicSecret6"),
    ] {
        std::fs::write(
            &p,
            format!("[[actions]]\nname = \"w\"\nwebhook = {{ url = \"{url}\" }}\n"),
        )
        .expect("write");
        let o = saltpipe(
            &[
                "validate",
                "--no-connect",
                "--config",
                p.to_str().expect("utf8"),
            ],
            &[],
        );
        assert_hidden(url, &all_output(&o), secret);
    }
}

/// `validate` connecting: real servers refusing the credentials (PostgreSQL
/// has no such role, MariaDB a wrong password, Redis and RabbitMQ a wrong
/// password), a closed port, and a NATS token: errors name the URL only redacted.
#[test]
fn failed_connections_never_print_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = common::write_config_source(dir.path(), "socket = \"/nonexistent/bus.ipc\"", "");
    let cases: &[(&str, &str, &str)] = &[
        (
            "SALTPIPE_SINK_URL",
            "postgres://nosuchrole:PgSecret1@127.0.0.1:5432/test",
            "PgSecret1",
        ),
        (
            "SALTPIPE_SINK_URL",
            "postgres://nosuchrole@127.0.0.1:5432/test?password=PgSecret2",
            "PgSecret2",
        ),
        (
            "SALTPIPE_SINK_URL",
            "mysql://root:MySecret3@127.0.0.1:3306/test",
            "MySecret3",
        ),
        (
            "SALTPIPE_QUEUE_URL",
            "redis://default:RedisSecret4@127.0.0.1:6379",
            "RedisSecret4",
        ),
        (
            "SALTPIPE_QUEUE_URL",
            "amqp://guest:AmqpSecret5@127.0.0.1:5672/%2f",
            "AmqpSecret5",
        ),
        (
            "SALTPIPE_QUEUE_URL",
            "nats://NatsSecret6@127.0.0.1:4222",
            "NatsSecret6",
        ),
        (
            "SALTPIPE_QUEUE_URL",
            "redis://:RedisSecret7@127.0.0.1:1",
            "RedisSecret7",
        ),
    ];
    for (var, value, secret) in cases {
        let o = saltpipe(
            &["validate", "--config", p.to_str().expect("utf8")],
            &[(var, value)],
        );
        let text = all_output(&o);
        assert!(!o.status.success(), "{value}: the bus is absent\n{text}");
        assert!(text.contains("***"), "{value}: the URL is shown\n{text}");
        assert_hidden(value, &text, secret);
    }
}

/// A start whose database is unreachable and whose broker refuses the
/// password logs both, repeatedly: never with the secret.
#[test]
fn a_start_that_cannot_connect_never_logs_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!(
            "[source]\nsocket = \"/nonexistent/bus.ipc\"\nreconnect_max = \"1s\"\n\
             [queue]\nurl = \"redis://default:StartSecret1@127.0.0.1:6379\"\nspool = \"{d}/spool\"\n\
             [sink]\nurl = \"postgres://salt:StartSecret2@127.0.0.1:1/salt\"\n\
             [metrics]\nenabled = false\n\
             [[actions]]\nname = \"slack\"\nwebhook = {{ url = \"https://hooks.slack.com/services/T0/B0/StartSecret3\" }}\n",
            d = dir.path().display()
        ),
    )
    .expect("write");
    let sp = common::Saltpipe::start(&["run"], &p);
    // The sink is deferred and the broker is retried: both are logged.
    sp.wait_log(
        "postgres://salt:***@127.0.0.1:1/salt",
        1,
        Duration::from_secs(30),
    );
    sp.wait_log("redis://***@127.0.0.1:6379", 1, Duration::from_secs(30));
    let log = sp.log.lock().expect("log").join("\n");
    for s in ["StartSecret1", "StartSecret2", "StartSecret3"] {
        assert_hidden("saltpipe run", &log, s);
    }
    sp.terminate();
}

#[test]
fn top_never_shows_credentials_of_its_url() {
    let o = saltpipe(
        &[
            "top",
            "--url",
            "http://admin:TopSecret1@127.0.0.1:1/metrics?token=TopSecret2",
            "--count",
            "1",
        ],
        &[],
    );
    let text = all_output(&o);
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert_hidden("top", &text, "TopSecret1");
    assert_hidden("top", &text, "TopSecret2");
}

#[test]
fn smtp_credentials_in_clear_text_to_another_host_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    let mail = |host: &str, tls: &str| {
        format!(
            "[[actions]]\nname = \"m\"\nemail = {{ host = \"{host}\", tls = \"{tls}\", username = \"u\", password = \"SmtpSecret\", from = \"a@example.org\", to = [\"b@example.org\"] }}\n"
        )
    };
    std::fs::write(&p, mail("smtp.example.org", "none")).expect("write");
    let o = saltpipe(
        &[
            "validate",
            "--no-connect",
            "--config",
            p.to_str().expect("utf8"),
        ],
        &[],
    );
    let text = all_output(&o);
    assert_eq!(o.status.code(), Some(3), "{text}");
    assert!(text.contains("email.tls"), "{text}");
    assert_hidden("smtp", &text, "SmtpSecret");
    for (host, tls) in [
        ("127.0.0.1", "none"),
        ("localhost", "none"),
        ("::1", "none"),
        ("smtp.example.org", "starttls"),
    ] {
        std::fs::write(&p, mail(host, tls)).expect("write");
        let o = saltpipe(
            &[
                "validate",
                "--no-connect",
                "--config",
                p.to_str().expect("utf8"),
            ],
            &[],
        );
        assert!(o.status.success(), "{host} {tls}: {}", all_output(&o));
    }
}

/// A real HTTP server on loopback recording what reaches it: (port, path,
/// the `x-api-key` header, body).
type Seen = Arc<Mutex<Vec<(u16, String, Option<String>, String)>>>;

async fn server(seen: Seen, redirect_to: Option<String>) -> u16 {
    use axum::http::{HeaderMap, StatusCode, Uri, header};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: String| {
        let seen = seen.clone();
        let redirect_to = redirect_to.clone();
        async move {
            let key = headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            seen.lock()
                .expect("lock")
                .push((port, uri.path().to_owned(), key, body));
            match (uri.path(), redirect_to) {
                ("/start", Some(to)) => (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, to)],
                    String::new(),
                )
                    .into_response(),
                _ => StatusCode::OK.into_response(),
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

fn webhook(toml_table: &str, body: Option<&str>) -> Webhook {
    let cfg: WebhookConfig = toml::from_str(toml_table).expect("webhook config");
    let mut sources = vec![];
    if let Some(b) = body {
        sources.push(("body", b.to_owned()));
    } else {
        sources.push(("body", saltpipe::action::DEFAULT_BODY.to_owned()));
    }
    let templates = Templates::with_json_body(&sources, cfg.is_json()).expect("templates");
    Webhook::new(&cfg, Duration::from_secs(5), Arc::new(templates)).expect("webhook")
}

fn job(context: serde_json::Value) -> Job {
    Job {
        key: "m".into(),
        context: Arc::new(context),
    }
}

#[tokio::test]
async fn webhook_redirects_are_not_followed_by_default() {
    let seen: Seen = Arc::default();
    let other = server(seen.clone(), None).await;
    // "Another host": another origin (port) on loopback.
    let first = server(
        seen.clone(),
        Some(format!("http://127.0.0.1:{other}/stolen")),
    )
    .await;
    let w = webhook(
        &format!(
            "url = \"http://127.0.0.1:{first}/start\"\nheaders = {{ x-api-key = \"HeaderSecret\" }}\n"
        ),
        None,
    );
    let err = w
        .fire(&job(serde_json::json!({"tag": "t"})))
        .await
        .expect_err("a redirect is a failure");
    assert!(matches!(err, ActionError::Permanent(_)), "{err}");
    assert!(err.to_string().contains("not followed"), "{err}");
    let s = seen.lock().expect("lock").clone();
    assert_eq!(s.len(), 1, "only the first server was reached: {s:?}");
    assert_eq!(s[0].0, first);

    // same-host: a redirect to another origin is still not followed, so
    // the custom header never reaches it.
    seen.lock().expect("lock").clear();
    let w = webhook(
        &format!(
            "url = \"http://127.0.0.1:{first}/start\"\nheaders = {{ x-api-key = \"HeaderSecret\" }}\nredirects = \"same-host\"\n"
        ),
        None,
    );
    assert!(w.fire(&job(serde_json::json!({"tag": "t"}))).await.is_err());
    let s = seen.lock().expect("lock").clone();
    assert!(s.iter().all(|(port, ..)| *port == first), "{s:?}");
}

#[tokio::test]
async fn same_host_redirects_are_followed_with_their_headers() {
    let seen: Seen = Arc::default();
    // A server that redirects to itself (a relative Location).
    let seen2 = seen.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let me = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
            let seen = seen2.clone();
            async move {
                let key = headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock()
                    .expect("lock")
                    .push((me, uri.path().to_owned(), key, body));
                if uri.path() == "/start" {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, "/final".to_owned())],
                    )
                        .into_response()
                } else {
                    axum::http::StatusCode::OK.into_response()
                }
            }
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let w = webhook(
        &format!(
            "url = \"http://127.0.0.1:{me}/start\"\nheaders = {{ x-api-key = \"k\" }}\nredirects = \"same-host\"\n"
        ),
        None,
    );
    w.fire(&job(serde_json::json!({"tag": "t"})))
        .await
        .expect("followed");
    let s = seen.lock().expect("lock").clone();
    let paths: Vec<&str> = s.iter().map(|(_, p, ..)| p.as_str()).collect();
    assert_eq!(paths, ["/start", "/final"]);
    assert_eq!(s[1].2.as_deref(), Some("k"), "same host keeps the header");
    assert_eq!(s[1].3, s[0].3, "307 keeps the body");
}

/// A minion id (or any value) cannot add keys to a JSON body.
#[tokio::test]
async fn template_values_cannot_inject_json_keys() {
    let seen: Seen = Arc::default();
    let port = server(seen.clone(), None).await;
    let evil = r#"", "admin": true, "x": ""#;
    let ctx = serde_json::json!({"minion": evil, "fun": "test.ping", "retcode": 1});
    let url = format!("url = \"http://127.0.0.1:{port}/hook\"\n");
    // Unquoted values are JSON values; `tojson` still works; concatenations too.
    let w = webhook(
        &url,
        Some(
            r#"{"text": {{ fun ~ " failed on " ~ minion }}, "m": {{ minion }}, "t": {{ minion | tojson }}, "r": {{ retcode }}}"#,
        ),
    );
    w.fire(&job(ctx.clone())).await.expect("sent");
    let body = seen.lock().expect("lock")[0].3.clone();
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["m", "r", "t", "text"], "{body}");
    assert_eq!(v["m"], evil);
    assert_eq!(v["t"], evil);
    assert_eq!(v["r"], 1);
    // A value put inside quotes by mistake renders invalid JSON: refused,
    // nothing sent.
    seen.lock().expect("lock").clear();
    let w = webhook(&url, Some(r#"{"text": "{{ minion }}"}"#));
    let err = w.fire(&job(ctx.clone())).await.expect_err("refused");
    assert!(matches!(err, ActionError::Permanent(_)), "{err}");
    assert!(seen.lock().expect("lock").is_empty());
    // A body that is not JSON is not escaped as JSON.
    let w = webhook(
        &format!("{url}content_type = \"text/plain\"\n"),
        Some("{{ minion }} failed"),
    );
    w.fire(&job(ctx)).await.expect("sent");
    assert_eq!(seen.lock().expect("lock")[0].3, format!("{evil} failed"));
}

#[tokio::test]
async fn webhook_errors_never_show_the_url_secret() {
    let w = webhook(
        "url = \"http://127.0.0.1:1/services/T0/B0/ErrSecret\"\n",
        None,
    );
    let err = w
        .fire(&job(serde_json::json!({"tag": "t"})))
        .await
        .expect_err("closed port");
    let msg = err.to_string();
    assert!(msg.contains("http://127.0.0.1:1/***"), "{msg}");
    assert_hidden("webhook error", &msg, "ErrSecret");
    assert_hidden("webhook error", &msg, "/services");
}

/// `saltpipe replay --json` of `capture` with `config`.
fn replay(config: &std::path::Path, capture: &std::path::Path, env: &[(&str, &str)]) -> Output {
    saltpipe(
        &[
            "replay",
            "--json",
            "--config",
            config.to_str().expect("utf8"),
            capture.to_str().expect("utf8"),
        ],
        env,
    )
}

/// msgpack of a JSON value, as Salt would send it.
fn mp(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("msgpack")
}

/// `[sink] redact` (the defaults) and the exec environment, through the
/// real binary: a job whose load carries an eauth password and a token, a
/// return whose pillar carries a db_password; an exec action records its
/// stdin and its environment while saltpipe's own environment holds
/// SALTPIPE_SINK_PASSWORD and a URL with a password.
#[test]
fn stored_rows_and_exec_children_never_see_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jid = "20261202120000000001";
    let load = serde_json::json!({
        "jid": jid, "fun": "state.apply", "tgt": "*", "tgt_type": "glob",
        "user": "ops", "arg": [{"pillar": {"db_password": "LoadSecret1"}, "__kwarg__": true}],
        "kwargs": {"eauth": "pam", "username": "ops", "password": "LoadSecret2", "token": "LoadSecret3"},
        "minions": ["m1"],
    });
    let ret = serde_json::json!({
        "cmd": "_return", "id": "m1", "jid": jid, "fun": "state.apply",
        "fun_args": [{"pillar": {"db_password": "RetSecret4"}}],
        "return": {"private_key": "RetSecret5", "ok": true}, "retcode": 0, "success": true,
    });
    let mut stream = saltpipe::bus::encode::frame(&format!("salt/job/{jid}/new"), &mp(&load));
    stream.extend(saltpipe::bus::encode::frame(
        &format!("salt/job/{jid}/ret/m1"),
        &mp(&ret),
    ));
    let capture = dir.path().join("capture.bin");
    std::fs::write(&capture, stream).expect("write capture");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let config = common::write_config_source(
        dir.path(),
        "socket = \"/nonexistent/bus.ipc\"",
        &format!(
            "[[actions]]\nname = \"record\"\nrate_limit = 0\n\
             exec = {{ command = [\"/bin/sh\", \"-c\", \"cat > $OUT/stdin-$$; /usr/bin/env > $OUT/env-$$\"], env = {{ OUT = \"{}\", EXTRA = \"1\" }} }}\n",
            out.display()
        ),
    );
    let o = replay(
        &config,
        &capture,
        &[
            ("SALTPIPE_SINK_PASSWORD", "EnvSecret6"),
            ("MY_DATABASE_URL", "postgres://u:EnvSecret7@db/x"),
        ],
    );
    let text = all_output(&o);
    assert!(o.status.success(), "{text}");
    let summary: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("replay --json output");
    // password, token, db_password (load); db_password, private_key (return).
    assert_eq!(summary["redacted"], 5, "{summary}");
    let db = common::open_db(dir.path());
    let stored: String = db
        .query_row(
            "SELECT (SELECT group_concat(load) FROM jids) || (SELECT group_concat(full_ret || `return`) FROM salt_returns)",
            [],
            |r| r.get(0),
        )
        .expect("rows");
    assert!(stored.contains(r#""password": "***""#), "{stored}");
    assert!(stored.contains(r#""eauth": "pam""#), "{stored}");
    assert!(stored.contains(r#""ok": true"#), "{stored}");
    let mut seen_stdin = 0;
    let mut seen_env = 0;
    for e in std::fs::read_dir(&out).expect("out") {
        let p = e.expect("entry").path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let content = std::fs::read_to_string(&p).expect("read");
        if name.starts_with("stdin-") {
            seen_stdin += 1;
        } else {
            seen_env += 1;
            let names: Vec<&str> = content
                .lines()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                .collect();
            assert!(
                names.contains(&"EXTRA") && names.contains(&"OUT"),
                "{content}"
            );
            assert!(names.contains(&"PATH"), "{content}");
            // What sh adds itself (PWD, SHLVL, _) aside, only PASSED and `env`.
            for n in names {
                assert!(
                    [
                        "PATH", "HOME", "LANG", "LC_ALL", "EXTRA", "OUT", "PWD", "SHLVL", "_"
                    ]
                    .contains(&n),
                    "{n} leaked into the child's environment:\n{content}"
                );
            }
        }
        for s in ["EnvSecret6", "EnvSecret7"] {
            assert_hidden(&name, &content, s);
        }
        for s in ["LoadSecret", "RetSecret"] {
            assert_hidden(&name, &content, s);
        }
    }
    assert_eq!(
        (seen_stdin, seen_env),
        (2, 2),
        "both events ran the command"
    );
    for s in [
        "LoadSecret1",
        "LoadSecret2",
        "LoadSecret3",
        "RetSecret4",
        "RetSecret5",
    ] {
        assert_hidden("stored rows", &stored, s);
        assert_hidden("saltpipe output", &text, s);
    }
    assert_hidden("saltpipe output", &text, "EnvSecret6");
}

/// An event the redactor cannot walk whole (nested past the transcoder's
/// 256 levels) may hold a secret it never reached, or one it passed on the
/// way: it is stored nowhere, not even in the dead letters, whose row
/// keeps its tag and why. The batch's other returns are stored.
#[test]
fn an_event_too_deep_to_check_for_secrets_is_never_stored() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().expect("tempdir");
    let jid = "20261202120000000002";
    let mut deep = json!(1);
    for _ in 0..300 {
        deep = Value::Array(vec![deep]);
    }
    let ret = |id: &str, value: Value| {
        json!({"cmd": "_return", "id": id, "jid": jid, "fun": "test.echo",
               "return": value, "retcode": 0, "success": true})
    };
    let mut stream = Vec::new();
    for (id, value) in [
        ("before", json!("fine")),
        // The password comes first: the redactor passes it, then gives up.
        ("deep", json!({"password": "DeepSecret8", "deep": deep})),
        ("after", json!("fine")),
    ] {
        stream.extend(saltpipe::bus::encode::frame(
            &format!("salt/job/{jid}/ret/{id}"),
            &mp(&ret(id, value)),
        ));
    }
    let capture = dir.path().join("capture.bin");
    std::fs::write(&capture, stream).expect("write capture");
    let config = common::write_config_source(dir.path(), "socket = \"/nonexistent/bus.ipc\"", "");
    let o = replay(&config, &capture, &[]);
    let text = all_output(&o);
    assert!(o.status.success(), "{text}");
    assert_hidden("saltpipe output", &text, "DeepSecret8");
    let db = common::open_db(dir.path());
    let ids = common::strings(&db, "SELECT id FROM salt_returns ORDER BY id");
    assert_eq!(ids, ["after", "before"]);
    let (tag, error, body): (String, String, Vec<u8>) = db
        .query_row(
            "SELECT tag, error, body FROM saltpipe_dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("one dead letter");
    assert_eq!(tag, format!("salt/job/{jid}/ret/deep"));
    assert!(error.contains("cannot be checked"), "{error}");
    assert!(body.is_empty(), "{} bytes kept", body.len());
    drop(db);
    // Nowhere in the database's files, whatever table or page.
    for e in std::fs::read_dir(dir.path()).expect("dir") {
        let p = e.expect("entry").path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("salt.db"))
        {
            let bytes = std::fs::read(&p).expect("read");
            assert!(
                !bytes.windows(11).any(|w| w == b"DeepSecret8"),
                "{} holds the secret",
                p.display()
            );
        }
    }
}
