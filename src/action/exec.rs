//! `exec`: runs a command with the event as JSON on its stdin.
//!
//! The command is an argv list, never a shell line, so nothing in an event
//! can inject a command. It runs under the action's timeout in a process
//! group of its own, and the whole group is killed when that passes (the
//! timeout drops the future; a guard kills on drop), so a script's own
//! children do not linger either. Exit 0
//! is success; any other exit is retried, as a pager script failing to
//! reach its service may pass later; a command that cannot start is not.
//!
//! The command starts with a clean environment: saltpipe's own holds
//! database and broker passwords (`SALTPIPE_SINK_PASSWORD`, URLs with
//! credentials), and a pager script has no business seeing them. It gets
//! only [`PASSED`] (those set in saltpipe's environment) plus exactly what
//! the action's `env` names.

use super::{Action, ActionError, Job, Templates};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// `exec = { command = ["/usr/local/bin/page", "--team", "ops"] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl ExecConfig {
    pub fn validate(&self) -> Result<(), String> {
        match self.command.first() {
            None => Err("exec.command needs at least the program".into()),
            Some(p) if p.is_empty() => Err("exec.command: the program is empty".into()),
            Some(_) => Ok(()),
        }
    }
}

/// The variables of saltpipe's environment a command inherits (when set).
pub const PASSED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL"];

/// The command's whole environment: [`PASSED`] from `from`, then `extra`
/// (which wins).
pub fn child_env(
    from: impl Fn(&str) -> Option<std::ffi::OsString>,
    extra: &BTreeMap<String, String>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: BTreeMap<std::ffi::OsString, std::ffi::OsString> = PASSED
        .iter()
        .filter_map(|k| from(k).map(|v| ((*k).into(), v)))
        .collect();
    for (k, v) in extra {
        env.insert(k.into(), v.into());
    }
    env.into_iter().collect()
}

pub struct Exec {
    command: Vec<String>,
    env: BTreeMap<String, String>,
    templates: Arc<Templates>,
}

impl Exec {
    pub fn new(cfg: &ExecConfig, templates: Arc<Templates>) -> Exec {
        Exec {
            command: cfg.command.clone(),
            env: cfg.env.clone(),
            templates,
        }
    }
}

#[async_trait]
impl Action for Exec {
    async fn fire(&self, job: &Job) -> Result<(), ActionError> {
        let input = self.templates.render("body", &job.context)?;
        let Some((program, args)) = self.command.split_first() else {
            return Err(ActionError::Permanent("empty command".into()));
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(child_env(|k| std::env::var_os(k), &self.env))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|e| ActionError::Permanent(format!("cannot start {program}: {e}")))?;
        let mut group = KillGroup(child.id());
        if let Some(mut stdin) = child.stdin.take() {
            // A command that exits without reading its stdin is its own business.
            let _ = stdin.write_all(input.as_bytes()).await;
            drop(stdin);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| ActionError::Retriable(format!("{program}: {e}")))?;
        // It exited by itself: its group may be gone, or reused. Leave it be.
        group.0 = None;
        if out.status.success() {
            return Ok(());
        }
        let stderr: String = String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(300)
            .collect();
        Err(ActionError::Retriable(format!(
            "{program} exited with {}: {}",
            out.status,
            stderr.trim()
        )))
    }
}

/// Kills a command's process group unless it exited by itself first.
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok())
            && pid > 0
        {
            // SAFETY: killpg(2) on the group we created for this command.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }
}
