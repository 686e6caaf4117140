//! `pgkeep ctl show-config` and `edit-config`.
//!
//! `edit-config` builds the new dynamic configuration from the current one (read from etcd
//! with its `mod_revision`) and the options, in this order: `--replace FILE` (start from the
//! file instead), `--apply FILE` (a merge patch: `null` deletes), each `-s key.path=value`, each
//! `-p name=value` (values are YAML scalars, as with patronictl: `-s loop_wait=5`,
//! `-p work_mem=16MB`, `-s pause=null` deletes). Without any of them, on a terminal, the
//! configuration is opened in `$VISUAL`/`$EDITOR` (default `vi`).
//!
//! The result is checked with [`pgkeep_core::ops::check_config`] **before** anything is sent:
//! an edit that adds or changes a key the agents would drop (security-relevant, unknown,
//! malformed, unsafe timing) is refused with a non-zero exit naming each key and why. Then the
//! change is shown as a diff and confirmed (unless `--force`; without a terminal `--force` is
//! required), and written with `PUT /config` to the leader with `If-Match` on the revision that
//! was read: a concurrent change aborts the edit (`aborted due to concurrent changes`) instead
//! of being overwritten. The leader checks the configuration again with its own allowlist.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use pgkeep_core::cluster::ClusterView;
use pgkeep_core::ops::{self, Refusal};
use reqwest::Method;
use serde_json::{Map, Value};

use super::file::Loaded;
use super::manual::{api_base, confirm};

/// `ctl edit-config`.
#[derive(Debug, Args)]
pub struct EditConfigArgs {
    /// Set a key: `key.path=value` (value in YAML; empty or `null` deletes the key).
    #[arg(short = 's', long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Set a PostgreSQL parameter: `name=value` (under `postgresql.parameters`).
    #[arg(short = 'p', long = "pg", value_name = "NAME=VALUE")]
    pub pg: Vec<String>,
    /// Merge this YAML file into the configuration (`null` deletes a key).
    #[arg(long, value_name = "FILE")]
    pub apply: Option<PathBuf>,
    /// Replace the configuration with this YAML file.
    #[arg(long, value_name = "FILE", conflicts_with = "apply")]
    pub replace: Option<PathBuf>,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub force: bool,
}

/// YAML text of a configuration.
pub(super) fn to_yaml(config: &Map<String, Value>) -> Result<String> {
    if config.is_empty() {
        return Ok("{}\n".to_owned());
    }
    serde_saphyr::to_string(config).context("rendering the configuration as YAML")
}

/// A YAML document that must be a mapping.
fn yaml_object(text: &str, what: &str) -> Result<Map<String, Value>> {
    match serde_saphyr::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(_) => bail!("{what}: expected a YAML mapping"),
        Err(e) => bail!("{what}: invalid YAML: {e}"),
    }
}

fn read_yaml_file(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    yaml_object(&text, &path.display().to_string())
}

/// `key=value` with the value parsed as a YAML scalar; empty or `null` means delete.
fn key_value(arg: &str, option: &str) -> Result<(String, Option<Value>)> {
    let Some((key, raw)) = arg.split_once('=') else {
        bail!("{option} {arg:?}: expected KEY=VALUE");
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("{option} {arg:?}: empty key");
    }
    let value = serde_saphyr::from_str::<Value>(raw)
        .with_context(|| format!("{option} {arg:?}: the value is not valid YAML"))?;
    Ok((key.to_owned(), (!value.is_null()).then_some(value)))
}

/// The configuration `args` ask for, from `current`. `None`: no option asks for anything.
pub(super) fn edited(
    current: &Map<String, Value>,
    args: &EditConfigArgs,
) -> Result<Option<Map<String, Value>>> {
    if args.set.is_empty() && args.pg.is_empty() && args.apply.is_none() && args.replace.is_none() {
        return Ok(None);
    }
    let mut config = match &args.replace {
        // As a merge patch onto nothing: `null` values mean absent keys.
        Some(f) => {
            let mut c = Map::new();
            ops::merge_patch(&mut c, &read_yaml_file(f)?);
            c
        }
        None => current.clone(),
    };
    if let Some(f) = &args.apply {
        ops::merge_patch(&mut config, &read_yaml_file(f)?);
    }
    for s in &args.set {
        let (key, value) = key_value(s, "-s")?;
        ops::merge_patch(&mut config, &ops::edit_patch(&key, value, false));
    }
    for p in &args.pg {
        let (key, value) = key_value(p, "-p")?;
        ops::merge_patch(&mut config, &ops::edit_patch(&key, value, true));
    }
    Ok(Some(config))
}

/// The refusal message: every key and why.
pub(super) fn refusal_text(refusals: &[Refusal]) -> String {
    let mut out = String::from("configuration refused, nothing was written:");
    for r in refusals {
        out.push_str(&format!(
            "\n  {}: {}{}",
            r.key,
            r.reason,
            if r.security {
                " (security-relevant: set it in each node's local configuration)"
            } else {
                ""
            }
        ));
    }
    out
}

/// A line diff of two texts in unified style (`-` removed, `+` added, ` ` kept), from the
/// longest common subsequence of lines. Configurations are small.
pub(super) fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("--- current\n+++ new\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!(" {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        }
    }
    out
}

/// Opens the configuration in the operator's editor and reads it back.
fn edit_interactively(current: &Map<String, Value>) -> Result<Map<String, Value>> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "nothing to change: give -s KEY=VALUE, -p NAME=VALUE, --apply FILE or --replace FILE \
             (an editor opens only on a terminal)"
        );
    }
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".to_owned());
    let path = std::env::temp_dir().join(format!(
        "pgkeep-config-{}-{}.yaml",
        std::process::id(),
        super::manual::now_unix_ms()
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(to_yaml(current)?.as_bytes())?;
    }
    let mut words = editor.split_whitespace();
    let program = words.next().unwrap_or("vi");
    let status = std::process::Command::new(program)
        .args(words)
        .arg(&path)
        .status();
    let result = match status {
        Ok(s) if s.success() => read_yaml_file(&path),
        Ok(s) => Err(anyhow::anyhow!(
            "the editor {program} failed ({s}); nothing changed"
        )),
        Err(e) => Err(anyhow::anyhow!("running the editor {program}: {e}")),
    };
    let _ = std::fs::remove_file(&path);
    result
}

/// The member whose REST API takes a configuration write: the leader, else the first member.
fn writer(view: &ClusterView) -> Result<String> {
    let name = view
        .leader
        .as_ref()
        .map(|l| l.name.clone())
        .or_else(|| view.members.keys().next().cloned());
    let Some(name) = name else {
        bail!("the cluster has no members whose REST API could write the configuration");
    };
    api_base(view, &name)
}

/// Runs `ctl show-config`.
pub(super) fn run_show(rt: &tokio::runtime::Runtime, loaded: &Loaded) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let Some(cfg) = &view.config else {
        bail!("the cluster has no (valid) dynamic configuration");
    };
    super::print_out(&to_yaml(&cfg.value)?)
}

/// Runs `ctl edit-config`.
pub(super) fn run_edit(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    args: &EditConfigArgs,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let empty = Map::new();
    let current = view.config.as_ref().map_or(&empty, |c| &c.value);
    let revision = view.config.as_ref().map(|c| c.mod_revision);
    let proposed = match edited(current, args)? {
        Some(c) => c,
        None => edit_interactively(current)?,
    };
    if ops::changed_paths(current, &proposed).is_empty() {
        return super::print_out("Not changing configuration.\n");
    }
    let checked = ops::check_config(
        view.config.as_ref().map(|c| &c.value),
        &proposed,
        &loaded.allowlist,
    )
    .map_err(|r| anyhow::anyhow!(refusal_text(&r)))?;
    let mut text = diff(&to_yaml(current)?, &to_yaml(&proposed)?);
    for w in &checked.warnings {
        text.push_str(&format!(
            "note: {} stays as it is; the agents ignore it ({})\n",
            w.path, w.reason
        ));
    }
    super::print_out(&text)?;
    confirm(
        "apply these changes to the cluster's configuration",
        args.force,
    )?;
    let base = writer(&view)?;
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let url = format!("{base}/config");
    let body = serde_json::to_string(&proposed)?;
    let resp = rt
        .block_on(client.send_json(Method::PUT, &url, &body, revision))
        .with_context(|| format!("PUT {url}"))?;
    match resp.status {
        200 => super::print_out("Configuration changed\n"),
        409 => bail!(
            "aborted due to concurrent changes: the configuration changed since it was read; run the command again"
        ),
        code => bail!("PUT {url}: HTTP {code}: {}", server_error(&resp.text())),
    }
}

/// The `error` field of a JSON error answer, or the text.
pub(super) fn server_error(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(set: &[&str], pg: &[&str]) -> EditConfigArgs {
        EditConfigArgs {
            set: set.iter().map(|s| s.to_string()).collect(),
            pg: pg.iter().map(|s| s.to_string()).collect(),
            apply: None,
            replace: None,
            force: true,
        }
    }

    #[test]
    fn set_and_pg_options_edit_like_patronictl() {
        let current =
            json!({"ttl": 30, "pause": true, "postgresql": {"parameters": {"work_mem": "4MB"}}});
        let current = current.as_object().unwrap();
        let out = edited(
            current,
            &args(
                &["loop_wait=5", "pause=null", "postgresql.use_slots=off"],
                &["max_connections=150", "work_mem=", "pgaudit.log=ddl"],
            ),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"ttl": 30, "loop_wait": 5, "postgresql": {"use_slots": false, "parameters": {"max_connections": 150, "pgaudit.log": "ddl"}}})
        );
        assert!(edited(current, &args(&[], &[])).unwrap().is_none());
        assert!(edited(current, &args(&["novalue"], &[])).is_err());
        assert!(edited(current, &args(&["a..b=1"], &[])).is_err());
    }

    #[test]
    fn apply_and_replace_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("patch.yml");
        std::fs::write(&f, "loop_wait: 3\npause: null\n").unwrap();
        let current = json!({"ttl": 30, "pause": true});
        let mut a = args(&[], &[]);
        a.apply = Some(f.clone());
        let out = edited(current.as_object().unwrap(), &a).unwrap().unwrap();
        assert_eq!(Value::Object(out), json!({"ttl": 30, "loop_wait": 3}));
        let mut r = args(&["ttl=20"], &[]);
        r.replace = Some(f);
        let out = edited(current.as_object().unwrap(), &r).unwrap().unwrap();
        assert_eq!(Value::Object(out), json!({"loop_wait": 3, "ttl": 20}));
    }

    #[test]
    fn diffs_show_changed_lines() {
        let d = diff("a: 1\nb: 2\nc: 3\n", "a: 1\nb: 5\nc: 3\nd: 4\n");
        assert_eq!(
            d,
            "--- current\n+++ new\n a: 1\n-b: 2\n+b: 5\n c: 3\n+d: 4\n"
        );
    }

    #[test]
    fn refusals_name_each_key() {
        let t = refusal_text(&[
            Refusal {
                key: "postgresql.parameters.archive_command".into(),
                reason: "it runs a command".into(),
                security: true,
            },
            Refusal {
                key: "bogus".into(),
                reason: "not used by pgkeep".into(),
                security: false,
            },
        ]);
        assert!(
            t.contains("archive_command: it runs a command (security-relevant"),
            "{t}"
        );
        assert!(t.contains("\n  bogus: not used by pgkeep"), "{t}");
    }
}
