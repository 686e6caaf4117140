//! Local callbacks (`postgresql.callbacks.*`, `postgresql.pre_promote`, `postgresql.before_stop`):
//! commands the agent runs on lifecycle events. They come from this file only, never from the
//! DCS (the dynamic-configuration policy drops them there, Patroni issue #1734), and they run
//! without a shell: a value is one absolute path, or a list `[program, arg, ...]` whose first
//! element is an absolute path. The program must be a regular, executable file that nobody but
//! root or the agent's user can change.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path};
use std::time::Duration;

use serde_json::Value;

/// An asynchronous callback event, with the name Patroni gives it (and passes as the first of
/// the three appended arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CallbackEvent {
    /// PostgreSQL was started by the agent (or found running when the agent started).
    OnStart,
    /// PostgreSQL was stopped by the agent.
    OnStop,
    /// PostgreSQL was restarted by the agent.
    OnRestart,
    /// PostgreSQL was told to reload its configuration.
    OnReload,
    /// The node's role changed (promoted, or started as a replica after being primary).
    OnRoleChange,
}

impl CallbackEvent {
    /// Every event, in documentation order.
    pub const ALL: [CallbackEvent; 5] = [
        CallbackEvent::OnStart,
        CallbackEvent::OnStop,
        CallbackEvent::OnRestart,
        CallbackEvent::OnReload,
        CallbackEvent::OnRoleChange,
    ];

    /// The key under `postgresql.callbacks` and the action argument.
    pub fn name(self) -> &'static str {
        match self {
            CallbackEvent::OnStart => "on_start",
            CallbackEvent::OnStop => "on_stop",
            CallbackEvent::OnRestart => "on_restart",
            CallbackEvent::OnReload => "on_reload",
            CallbackEvent::OnRoleChange => "on_role_change",
        }
    }
}

/// A command run without a shell: `argv[0]` is an absolute path to the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackCommand {
    /// Program and its fixed arguments.
    pub argv: Vec<String>,
}

impl CallbackCommand {
    /// The program.
    pub fn program(&self) -> &Path {
        Path::new(&self.argv[0])
    }
}

/// The word passed as the role argument for a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryRoleWord {
    /// `master`, as Patroni 3.x passes it (the default).
    Master,
    /// `primary`, as Patroni 4 passes it.
    Primary,
}

impl PrimaryRoleWord {
    /// The word.
    pub fn as_str(self) -> &'static str {
        match self {
            PrimaryRoleWord::Master => "master",
            PrimaryRoleWord::Primary => "primary",
        }
    }
}

/// Default bound on every callback's run time.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's callbacks.
#[derive(Debug, Clone)]
pub struct Callbacks {
    /// Asynchronous callbacks by event.
    pub events: BTreeMap<CallbackEvent, CallbackCommand>,
    /// Run synchronously after the leader key is taken and before promotion; a failure (or a
    /// timeout) aborts the promotion.
    pub pre_promote: Option<CallbackCommand>,
    /// Run synchronously before the agent stops PostgreSQL; its failure is logged only.
    pub before_stop: Option<CallbackCommand>,
    /// Bound on each run (`pgkeep.callback_timeout`); the process group is killed after it.
    pub timeout: Duration,
    /// The role word for a primary (`pgkeep.callback_primary_role`).
    pub primary_role: PrimaryRoleWord,
}

impl Default for Callbacks {
    fn default() -> Self {
        Callbacks {
            events: BTreeMap::new(),
            pre_promote: None,
            before_stop: None,
            timeout: DEFAULT_CALLBACK_TIMEOUT,
            primary_role: PrimaryRoleWord::Master,
        }
    }
}

impl Callbacks {
    /// True when nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.pre_promote.is_none() && self.before_stop.is_none()
    }
}

/// Characters that mean something to a shell. pgkeep never uses one, so a string holding them
/// was almost certainly written for Patroni's `shlex` splitting and would not do what it says.
const SHELL_SYNTAX: &[char] = &[
    ';', '&', '|', '<', '>', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '{', '}', '(', ')',
    '~', '#', '!', '=',
];

/// Parses one configured command (a string or a list of strings) and checks its program.
pub(super) fn command(value: &Value) -> Result<CallbackCommand, String> {
    let argv = match value {
        Value::String(s) => {
            if s.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{s:?} has arguments; pgkeep runs callbacks without a shell, so give the \
                     command as a list, e.g. [/usr/local/bin/script, arg]"
                ));
            }
            vec![s.clone()]
        }
        Value::Array(items) => {
            let mut argv = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::String(s) = item else {
                    return Err(format!("element {i} is {item}, not a string"));
                };
                if s.contains('\0') {
                    return Err(format!("element {i} contains a NUL byte"));
                }
                argv.push(s.clone());
            }
            if argv.is_empty() {
                return Err("the list is empty; give at least the program's absolute path".into());
            }
            argv
        }
        other => {
            return Err(format!(
                "{other} is neither an absolute path nor a list [program, arg, ...]"
            ));
        }
    };
    let program = &argv[0];
    if let Some(c) = program
        .chars()
        .find(|c| SHELL_SYNTAX.contains(c) || c.is_control())
    {
        return Err(format!(
            "the program {program:?} contains shell syntax ({c:?}); pgkeep runs callbacks \
             without a shell: give an absolute path, or a list [program, arg, ...]"
        ));
    }
    check_program(Path::new(program))?;
    Ok(CallbackCommand { argv })
}

/// Checks that `path` may be run as a callback by this user: an absolute path to a regular
/// executable file, owned by root or this user and writable by nobody else, in a directory
/// that others cannot write to (directories further up may be world-writable only with the
/// sticky bit, like `/tmp`). Symbolic links are followed, and the link's own directory is
/// checked as well as the target's. Also run before each execution: the file may have changed
/// since the configuration was loaded.
pub fn check_program(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown} is not an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{shown} contains '.' or '..' components"));
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{shown} does not exist"),
        _ => format!("{shown}: {e}"),
    })?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode();
    let me = nix::unistd::geteuid().as_raw();
    if mode & 0o111 == 0 || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(format!("{shown} is not executable by this user (uid {me})"));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "{shown} is writable by group or others; run `chmod go-w` on it"
        ));
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{shown} belongs to uid {}, not to root or this user (uid {me})",
            meta.uid()
        ));
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("{shown}: {e}"))?;
    check_directories(path)?;
    if real != path {
        check_directories(&real)?;
    }
    Ok(())
}

/// The directory holding `path` is not world-writable and belongs to root or this user; the
/// directories above it are world-writable only with the sticky bit.
fn check_directories(path: &Path) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    for (depth, dir) in path.ancestors().skip(1).enumerate() {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = meta.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        if depth == 0 {
            if mode & 0o002 != 0 {
                return Err(format!(
                    "{} is in {}, which is writable by everyone",
                    path.display(),
                    dir.display()
                ));
            }
            if meta.uid() != 0 && meta.uid() != me {
                return Err(format!(
                    "{} is in {}, which belongs to uid {}, not to root or this user (uid {me})",
                    path.display(),
                    dir.display(),
                    meta.uid()
                ));
            }
        } else if mode & 0o002 != 0 && !sticky {
            return Err(format!(
                "{} is below {}, which is writable by everyone",
                path.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Builds the checked [`Callbacks`] from the file's `postgresql.callbacks`,
/// `postgresql.pre_promote`, `postgresql.before_stop`, `pgkeep.callback_timeout` and
/// `pgkeep.callback_primary_role`.
pub(super) fn resolve(
    file: &Path,
    events: Option<serde_json::Map<String, Value>>,
    pre_promote: Option<Value>,
    before_stop: Option<Value>,
    timeout: Option<u64>,
    role: Option<&str>,
) -> Result<Callbacks, super::ConfigError> {
    let err = |key: &str, reason: String| super::ConfigError::new(file, key, reason);
    let mut out = Callbacks::default();
    for (name, value) in events.unwrap_or_default() {
        let key = format!("postgresql.callbacks.{name}");
        let event = CallbackEvent::ALL
            .into_iter()
            .find(|e| e.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = CallbackEvent::ALL.iter().map(|e| e.name()).collect();
                err(
                    &key,
                    format!("unknown callback (known: {})", known.join(", ")),
                )
            })?;
        if value.is_null() {
            continue;
        }
        out.events
            .insert(event, command(&value).map_err(|r| err(&key, r))?);
    }
    let one =
        |v: Option<Value>, key: &str| -> Result<Option<CallbackCommand>, super::ConfigError> {
            v.filter(|v| !v.is_null())
                .map(|v| command(&v).map_err(|r| err(key, r)))
                .transpose()
        };
    out.pre_promote = one(pre_promote, "postgresql.pre_promote")?;
    out.before_stop = one(before_stop, "postgresql.before_stop")?;
    if let Some(t) = timeout {
        if t == 0 || t > 3600 {
            return Err(err(
                "pgkeep.callback_timeout",
                format!("{t} is not between 1 and 3600 seconds"),
            ));
        }
        out.timeout = Duration::from_secs(t);
    }
    if let Some(r) = role {
        out.primary_role = primary_role(r).map_err(|e| err("pgkeep.callback_primary_role", e))?;
    }
    Ok(out)
}

/// `pgkeep.callback_primary_role`.
pub(super) fn primary_role(s: &str) -> Result<PrimaryRoleWord, String> {
    match s {
        "master" => Ok(PrimaryRoleWord::Master),
        "primary" => Ok(PrimaryRoleWord::Primary),
        other => Err(format!(
            "{other:?} is neither master (Patroni 3) nor primary (Patroni 4)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    /// A directory not writable by others, holding an executable script.
    fn script(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().join("cb.sh");
        fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn a_path_or_a_list_is_accepted() {
        let (_d, p) = script(0o755);
        assert_eq!(command(&json!(s(&p))).unwrap().argv, vec![s(&p)]);
        let c = command(&json!([s(&p), "up", "a b; c", "$HOME"])).unwrap();
        assert_eq!(
            c.argv,
            vec![s(&p), "up".into(), "a b; c".into(), "$HOME".into()]
        );
        assert_eq!(c.program(), p.as_path());
    }

    #[test]
    fn shell_syntax_and_arguments_in_a_string_are_refused() {
        let (_d, p) = script(0o755);
        let e = command(&json!(format!("{} up", s(&p)))).unwrap_err();
        assert!(e.contains("as a list"), "{e}");
        let e = command(&json!(format!("{};reboot", s(&p)))).unwrap_err();
        assert!(e.contains("shell syntax"), "{e}");
        let e = command(&json!(["/bin/$(id)"])).unwrap_err();
        assert!(e.contains("shell syntax"), "{e}");
        let e = command(&json!("sh -c 'touch /tmp/x'")).unwrap_err();
        assert!(e.contains("without a shell"), "{e}");
        assert!(command(&json!([])).unwrap_err().contains("empty"));
        assert!(
            command(&json!([s(&p), 1]))
                .unwrap_err()
                .contains("not a string")
        );
        assert!(command(&json!(7)).unwrap_err().contains("neither"));
    }

    #[test]
    fn the_program_must_be_a_safe_executable() {
        let (d, p) = script(0o755);
        assert!(check_program(&p).is_ok());
        let e = check_program(Path::new("cb.sh")).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        let e = check_program(&d.path().join("missing")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_program(d.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = check_program(&d.path().join("x/../cb.sh")).unwrap_err();
        assert!(e.contains("'..'"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_program(&p).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_program(&p).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o757)).unwrap();
        assert!(check_program(&p).is_err());
    }

    #[test]
    fn world_writable_directories_are_refused() {
        let (d, p) = script(0o755);
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_program(&p).unwrap_err();
        assert!(e.contains("writable by everyone"), "{e}");
        // Sticky (like /tmp) is still refused for the directory that holds the program...
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_program(&p).is_err());
        // ...but fine further up.
        let sub = d.path().join("bin");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        let q = sub.join("cb.sh");
        fs::copy(&p, &q).unwrap();
        fs::set_permissions(&q, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_program(&q).is_ok(), "{:?}", check_program(&q));
        // Without the sticky bit, a world-writable ancestor could swap the directory.
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_program(&q).unwrap_err().contains("below"));
    }

    #[test]
    fn a_symlink_is_checked_at_both_ends() {
        let (d, p) = script(0o755);
        let open = tempfile::tempdir().unwrap();
        fs::set_permissions(open.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(check_program(&link).is_ok());
        // The target sits in a world-writable directory: refused through the link too.
        let target = open.path().join("t.sh");
        fs::copy(&p, &target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link2 = d.path().join("link2");
        std::os::unix::fs::symlink(&target, &link2).unwrap();
        assert!(
            check_program(&link2)
                .unwrap_err()
                .contains("writable by everyone")
        );
    }

    #[test]
    fn resolve_names_the_key_of_each_error() {
        let (_d, p) = script(0o755);
        let f = Path::new("/etc/pgkeep/node.yml");
        let events = |v: Value| v.as_object().cloned();
        let c = resolve(
            f,
            events(json!({"on_start": s(&p), "on_role_change": [s(&p), "x"], "on_stop": null})),
            Some(json!(s(&p))),
            None,
            Some(5),
            Some("primary"),
        )
        .unwrap();
        assert_eq!(c.events.len(), 2);
        assert_eq!(c.events[&CallbackEvent::OnRoleChange].argv[1], "x");
        assert!(c.pre_promote.is_some() && c.before_stop.is_none());
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.primary_role, PrimaryRoleWord::Primary);
        let d = resolve(f, None, None, None, None, None).unwrap();
        assert!(d.is_empty());
        assert_eq!(d.timeout, DEFAULT_CALLBACK_TIMEOUT);
        assert_eq!(d.primary_role.as_str(), "master");

        let key = |r: Result<Callbacks, super::super::ConfigError>| r.unwrap_err().key;
        assert_eq!(
            key(resolve(
                f,
                events(json!({"on_x": s(&p)})),
                None,
                None,
                None,
                None
            )),
            "postgresql.callbacks.on_x"
        );
        assert_eq!(
            key(resolve(
                f,
                events(json!({"on_reload": "/nope"})),
                None,
                None,
                None,
                None
            )),
            "postgresql.callbacks.on_reload"
        );
        assert_eq!(
            key(resolve(f, None, None, Some(json!("x y")), None, None)),
            "postgresql.before_stop"
        );
        assert_eq!(
            key(resolve(f, None, Some(json!(1)), None, None, None)),
            "postgresql.pre_promote"
        );
        assert_eq!(
            key(resolve(f, None, None, None, Some(0), None)),
            "pgkeep.callback_timeout"
        );
        assert_eq!(
            key(resolve(f, None, None, None, None, Some("boss"))),
            "pgkeep.callback_primary_role"
        );
    }

    #[test]
    fn primary_role_words() {
        assert_eq!(primary_role("master").unwrap().as_str(), "master");
        assert_eq!(primary_role("primary").unwrap().as_str(), "primary");
        assert!(primary_role("leader").is_err());
    }
}
