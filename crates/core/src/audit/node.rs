//! Checks of one node's server parameters: TLS, logging and auditing, data safety.

use super::{Check, Group, NodeFacts, Severity, Verdict, fail, manual, not_applicable, pass, warn};

mod access;

/// The setting `name`, or the verdict when it cannot be judged.
pub(super) fn setting<'a>(n: &'a NodeFacts, name: &str) -> Result<&'a str, Verdict> {
    if n.settings.is_empty() {
        return Err(manual("the server's settings were not collected"));
    }
    n.settings
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| not_applicable(format!("{name} is not a setting of this server")))
}

/// Passes when `name` is one of `good`.
fn one_of(n: &NodeFacts, name: &str, good: &[&str]) -> Verdict {
    match setting(n, name) {
        Ok(v) if good.contains(&v) => pass(format!("{name} = {v}")),
        Ok(v) => fail(format!("{name} = {v:?} (expected {})", good.join(" or "))),
        Err(v) => v,
    }
}

fn on(n: &NodeFacts, name: &str) -> Verdict {
    one_of(n, name, &["on"])
}

fn off(n: &NodeFacts, name: &str) -> Verdict {
    one_of(n, name, &["off"])
}

fn ssl_on(n: &NodeFacts) -> Verdict {
    on(n, "ssl")
}

fn ssl_min_protocol(n: &NodeFacts) -> Verdict {
    one_of(n, "ssl_min_protocol_version", &["TLSv1.2", "TLSv1.3"])
}

fn ssl_ciphers(n: &NodeFacts) -> Verdict {
    let v = match setting(n, "ssl_ciphers") {
        Ok(v) => v,
        Err(v) => return v,
    };
    let lower = v.to_ascii_lowercase();
    let weak: Vec<&str> = ["@seclevel=0", "null", "export", "rc4", "des", "md5", "anon"]
        .into_iter()
        .filter(|w| {
            lower
                .split([':', ',', ' '])
                .any(|c| !c.starts_with('!') && !c.starts_with('-') && c.contains(w))
        })
        .collect();
    if weak.is_empty() {
        pass(format!("ssl_ciphers = {v}"))
    } else {
        fail(format!("ssl_ciphers = {v} admits {}", weak.join(", ")))
    }
}

fn password_encryption(n: &NodeFacts) -> Verdict {
    one_of(n, "password_encryption", &["scram-sha-256"])
}

/// The server's log is kept: by the logging collector, or (pgkeep's way) by whoever started
/// the server, which writes its output to a file the collector found.
fn server_log_kept(n: &NodeFacts) -> Verdict {
    match setting(n, "logging_collector") {
        Ok("on") => pass("logging_collector = on"),
        Ok(_) => match n.files.iter().find(|f| f.kind == "server_log") {
            Some(f) => pass(format!(
                "logging_collector = off; the server's output is kept in {}",
                f.path
            )),
            None => fail("logging_collector = off and no file keeps the server's output"),
        },
        Err(v) => v,
    }
}

/// Settings that only matter to the logging collector.
fn collector_setting(n: &NodeFacts, check: fn(&NodeFacts) -> Verdict) -> Verdict {
    match setting(n, "logging_collector") {
        Ok("on") => check(n),
        Ok(_) => {
            not_applicable("logging_collector = off (the server's output file is checked by FS-05)")
        }
        Err(v) => v,
    }
}

fn log_connections(n: &NodeFacts) -> Verdict {
    on(n, "log_connections")
}

fn log_disconnections(n: &NodeFacts) -> Verdict {
    on(n, "log_disconnections")
}

fn log_file_mode(n: &NodeFacts) -> Verdict {
    collector_setting(n, |n| one_of(n, "log_file_mode", &["0600"]))
}

fn log_directory_outside_data(n: &NodeFacts) -> Verdict {
    collector_setting(n, log_directory_outside_data_dir)
}

fn log_directory_outside_data_dir(n: &NodeFacts) -> Verdict {
    let (dir, data) = match (setting(n, "log_directory"), setting(n, "data_directory")) {
        (Ok(d), Ok(data)) => (d, data),
        (Err(v), _) | (_, Err(v)) => return v,
    };
    if !dir.starts_with('/') {
        return fail(format!(
            "log_directory = {dir} (relative: inside the data directory)"
        ));
    }
    let data = data.trim_end_matches('/');
    if dir == data || dir.starts_with(&format!("{data}/")) {
        fail(format!(
            "log_directory = {dir} is inside the data directory {data}"
        ))
    } else {
        pass(format!("log_directory = {dir}"))
    }
}

fn log_line_prefix(n: &NodeFacts) -> Verdict {
    let v = match setting(n, "log_line_prefix") {
        Ok(v) => v,
        Err(v) => return v,
    };
    let missing: Vec<&str> = [
        ("%m", "%t"),
        ("%p", "%p"),
        ("%d", "%d"),
        ("%u", "%u"),
        ("%h", "%r"),
    ]
    .iter()
    .filter(|(a, b)| !v.contains(a) && !v.contains(b))
    .map(|(a, _)| *a)
    .collect();
    if missing.is_empty() {
        pass(format!("log_line_prefix = {v:?}"))
    } else {
        warn(format!(
            "log_line_prefix = {v:?} lacks {}",
            missing.join(" ")
        ))
    }
}

fn preloads(n: &NodeFacts) -> Result<Vec<&str>, Verdict> {
    Ok(setting(n, "shared_preload_libraries")?
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty())
        .collect())
}

fn pgaudit_loaded(n: &NodeFacts) -> Verdict {
    match preloads(n) {
        Ok(libs) if libs.contains(&"pgaudit") => {
            pass(format!("shared_preload_libraries = {}", libs.join(",")))
        }
        Ok(libs) => fail(format!(
            "shared_preload_libraries = {:?}: pgaudit is not loaded",
            libs.join(",")
        )),
        Err(v) => v,
    }
}

fn pgaudit_classes(n: &NodeFacts) -> Verdict {
    let v = match setting(n, "pgaudit.log") {
        Ok(v) => v,
        Err(_) => return fail("pgaudit.log is not set (pgaudit not loaded)"),
    };
    let classes: Vec<String> = v
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let has = |c: &str| classes.iter().any(|x| x == c || x == "all");
    let missing: Vec<&str> = ["ddl", "role"].into_iter().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        pass(format!("pgaudit.log = {v}"))
    } else {
        fail(format!(
            "pgaudit.log = {v:?} does not include {}",
            missing.join(", ")
        ))
    }
}

fn pgaudit_parameters(n: &NodeFacts) -> Verdict {
    match setting(n, "pgaudit.log_parameter") {
        Ok("off") => pass("pgaudit.log_parameter = off"),
        Ok(v) => warn(format!(
            "pgaudit.log_parameter = {v}: statement parameters (possibly secrets) reach the log"
        )),
        Err(_) => not_applicable("pgaudit is not loaded"),
    }
}

fn log_min_messages(n: &NodeFacts) -> Verdict {
    match setting(n, "log_min_messages") {
        Ok(v @ ("warning" | "error" | "log" | "fatal" | "panic")) => {
            pass(format!("log_min_messages = {v}"))
        }
        Ok(v) if v.starts_with("debug") => fail(format!("log_min_messages = {v}")),
        Ok(v) => warn(format!(
            "log_min_messages = {v} (warning is the benchmark's level)"
        )),
        Err(v) => v,
    }
}

fn debug_print(n: &NodeFacts) -> Verdict {
    let names = [
        "debug_print_parse",
        "debug_print_rewritten",
        "debug_print_plan",
    ];
    if n.settings.is_empty() {
        return manual("the server's settings were not collected");
    }
    let on: Vec<&str> = names
        .into_iter()
        .filter(|k| n.settings.get(*k).is_some_and(|v| v == "on"))
        .collect();
    if on.is_empty() {
        pass("debug_print_* are off")
    } else {
        fail(format!("{} on: query trees reach the log", on.join(", ")))
    }
}

fn log_replication_commands(n: &NodeFacts) -> Verdict {
    on(n, "log_replication_commands")
}

fn fsync(n: &NodeFacts) -> Verdict {
    on(n, "fsync")
}

fn full_page_writes(n: &NodeFacts) -> Verdict {
    on(n, "full_page_writes")
}

fn rewind_possible(n: &NodeFacts) -> Verdict {
    match (n.data_checksums, setting(n, "wal_log_hints")) {
        (Some(true), _) => pass("data checksums are on"),
        (_, Ok("on")) => pass("wal_log_hints = on"),
        (None, Err(v)) => v,
        _ => fail("neither data checksums nor wal_log_hints: pg_rewind cannot run"),
    }
}

fn data_checksums(n: &NodeFacts) -> Verdict {
    match n.data_checksums {
        Some(true) => pass("data checksums are on"),
        Some(false) => {
            warn("data checksums are off (initdb --data-checksums; pg_checksums --enable offline)")
        }
        None => manual("data checksums were not collected"),
    }
}

fn system_table_mods(n: &NodeFacts) -> Verdict {
    off(n, "allow_system_table_mods")
}

fn system_indexes(n: &NodeFacts) -> Verdict {
    off(n, "ignore_system_indexes")
}

fn damaged_pages(n: &NodeFacts) -> Verdict {
    match (
        off(n, "zero_damaged_pages"),
        off(n, "ignore_checksum_failure"),
    ) {
        ((super::Status::Pass, a), (super::Status::Pass, b)) => pass(format!("{a}, {b}")),
        ((super::Status::Pass, _), other) | (other, _) => other,
    }
}

fn library_path(n: &NodeFacts) -> Verdict {
    one_of(n, "dynamic_library_path", &["$libdir"])
}

fn archive_mode(n: &NodeFacts) -> Verdict {
    one_of(n, "archive_mode", &["on", "always"])
}

fn archive_command(n: &NodeFacts) -> Verdict {
    if let Ok(lib) = setting(n, "archive_library")
        && !lib.is_empty()
    {
        return warn(format!("archive_library = {lib}: not pgBackRest"));
    }
    match setting(n, "archive_command") {
        Ok(v) if v.contains("pgbackrest") && v.contains("archive-push") => {
            pass(format!("archive_command = {v}"))
        }
        Ok(v) => fail(format!(
            "archive_command = {v:?} is not pgBackRest's archive-push"
        )),
        Err(v) => v,
    }
}

fn slot_wal_keep(n: &NodeFacts) -> Verdict {
    match setting(n, "max_slot_wal_keep_size") {
        Ok("-1") => warn("max_slot_wal_keep_size = -1: a dead replica's slot can fill the disk"),
        Ok(v) => pass(format!("max_slot_wal_keep_size = {v}")),
        Err(v) => v,
    }
}

fn jit_support(n: &NodeFacts) -> Verdict {
    match (
        off(n, "jit_debugging_support"),
        off(n, "jit_profiling_support"),
    ) {
        ((super::Status::Pass, _), (super::Status::Pass, _)) => {
            pass("jit debugging and profiling support off")
        }
        ((super::Status::Pass, _), other) | (other, _) => other,
    }
}

fn post_auth_delay(n: &NodeFacts) -> Verdict {
    one_of(n, "post_auth_delay", &["0"])
}

fn authentication_timeout(n: &NodeFacts) -> Verdict {
    match setting(n, "authentication_timeout").map(str::parse::<u32>) {
        Ok(Ok(s)) if s <= 60 => pass(format!("authentication_timeout = {s}s")),
        Ok(Ok(s)) => fail(format!("authentication_timeout = {s}s (at most 60)")),
        Ok(Err(_)) => fail("authentication_timeout is not a number of seconds"),
        Err(v) => v,
    }
}

fn listen_addresses(n: &NodeFacts) -> Verdict {
    match setting(n, "listen_addresses") {
        Ok(v)
            if v.split(',')
                .any(|a| matches!(a.trim(), "*" | "0.0.0.0" | "::")) =>
        {
            fail(format!("listen_addresses = {v}: every interface"))
        }
        Ok(v) => pass(format!("listen_addresses = {v}")),
        Err(v) => v,
    }
}

fn port(n: &NodeFacts) -> Verdict {
    match setting(n, "port") {
        Ok("5432") => warn("port = 5432, the default every scanner tries first"),
        Ok(v) => pass(format!("port = {v}")),
        Err(v) => v,
    }
}

fn log_timezone(n: &NodeFacts) -> Verdict {
    match setting(n, "log_timezone") {
        Ok(v @ ("UTC" | "Etc/UTC" | "GMT" | "Etc/GMT")) => pass(format!("log_timezone = {v}")),
        Ok(v) => warn(format!(
            "log_timezone = {v}: log times of hosts in other zones do not line up"
        )),
        Err(v) => v,
    }
}

fn reserved_connections(n: &NodeFacts) -> Verdict {
    match setting(n, "superuser_reserved_connections").map(str::parse::<u32>) {
        Ok(Ok(r)) if r >= 3 => pass(format!("superuser_reserved_connections = {r}")),
        Ok(Ok(r)) => fail(format!(
            "superuser_reserved_connections = {r}: with every slot taken the agent cannot connect"
        )),
        Ok(Err(_)) => fail("superuser_reserved_connections is not a number"),
        Err(v) => v,
    }
}

fn encrypted_storage(n: &NodeFacts) -> Verdict {
    match n.data_encrypted {
        Some(true) => pass("the data directory is on dm-crypt storage"),
        Some(false) => warn(
            "the data directory is not on encrypted storage: a stolen disk or snapshot is readable \
             (PostgreSQL 15 has no TDE; encrypt the volume with LUKS)",
        ),
        None => manual("the storage under the data directory was not examined"),
    }
}

/// `15.10 (Debian 15.10-0+deb12u1)` (the server) or `15.10-0+deb12u1` (the package, with an
/// optional epoch) → `15.10`.
fn major_minor(v: &str) -> &str {
    let v = v.split_whitespace().next().unwrap_or(v);
    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
    v.split('-').next().unwrap_or(v)
}

fn running_installed_version(n: &NodeFacts) -> Verdict {
    let running = match setting(n, "server_version") {
        Ok(v) => major_minor(v),
        Err(v) => return v,
    };
    match n.installed_version.as_deref() {
        None => manual("the installed package's version was not read"),
        Some(i) if major_minor(i) == running => pass(format!("running {running}, as installed")),
        Some(i) => fail(format!(
            "running {running}, installed {}: restart (a switchover at a time) to load the update",
            major_minor(i)
        )),
    }
}

/// The checks of this module and of [`access`].
pub(super) fn checks() -> Vec<Check> {
    use Group::*;
    use Severity::*;
    let c = super::node_check;
    let mut v = vec![
        c(
            "PG-TLS-01",
            Tls,
            "TLS is on",
            Critical,
            "ssl = on with the node's certificate (pgkeep renders it)",
            &["CIS 6.8", "guide: SSL"],
            ssl_on,
        ),
        c(
            "PG-TLS-02",
            Tls,
            "TLS 1.2 or newer only",
            High,
            "ssl_min_protocol_version = 'TLSv1.2' (or TLSv1.3)",
            &["CIS 6.8"],
            ssl_min_protocol,
        ),
        c(
            "PG-TLS-03",
            Tls,
            "No weak TLS ciphers",
            High,
            "ssl_ciphers = 'HIGH:!aNULL:!MD5' or stricter; never @SECLEVEL=0",
            &["CIS 6.10"],
            ssl_ciphers,
        ),
        c(
            "PG-AUTH-01",
            Authentication,
            "New passwords are stored as SCRAM",
            High,
            "password_encryption = 'scram-sha-256'",
            &["CIS 5.12", "guide: scram-sha-256"],
            password_encryption,
        ),
        c(
            "PG-AUTH-10",
            Authentication,
            "Authentication timeout at most 60 s",
            Low,
            "authentication_timeout = '60s' or less",
            &["CIS 5.7"],
            authentication_timeout,
        ),
        c(
            "PG-AUTH-11",
            Authentication,
            "Listens on named addresses only",
            Low,
            "listen_addresses = the node's own address",
            &["CIS 5.2"],
            listen_addresses,
        ),
        c(
            "PG-AUTH-12",
            Authentication,
            "Non-default port",
            Low,
            "a port other than 5432 (pgkeep up allocates one)",
            &["guide: non-default ports"],
            port,
        ),
        c(
            "PG-LOG-01",
            Logging,
            "The server's log is kept",
            Medium,
            "logging_collector = on, or the server's output written to a file by its supervisor (pgkeep does)",
            &["CIS 3.1.2"],
            server_log_kept,
        ),
        c(
            "PG-LOG-02",
            Logging,
            "Connections logged",
            Low,
            "log_connections = on",
            &["CIS 3.1.20"],
            log_connections,
        ),
        c(
            "PG-LOG-03",
            Logging,
            "Disconnections logged",
            Low,
            "log_disconnections = on",
            &["CIS 3.1.21"],
            log_disconnections,
        ),
        c(
            "PG-LOG-04",
            Logging,
            "Log files readable by the owner only",
            Medium,
            "log_file_mode = 0600",
            &["CIS 3.1.6"],
            log_file_mode,
        ),
        c(
            "PG-LOG-05",
            Logging,
            "Logs outside the data directory",
            Low,
            "log_directory = an absolute path outside the data directory",
            &["CIS 3.1.27"],
            log_directory_outside_data,
        ),
        c(
            "PG-LOG-06",
            Logging,
            "Log lines name time, process, database, user and client",
            Low,
            "log_line_prefix = '%m [%p] %q%u@%d %h '",
            &["CIS 3.1.24"],
            log_line_prefix,
        ),
        c(
            "PG-LOG-07",
            Logging,
            "pgaudit is loaded",
            High,
            "shared_preload_libraries includes pgaudit (restart)",
            &["CIS 3.2", "guide: pgaudit"],
            pgaudit_loaded,
        ),
        c(
            "PG-LOG-08",
            Logging,
            "pgaudit logs DDL and role changes",
            Medium,
            "pgaudit.log = 'ddl,role' (or more)",
            &["CIS 3.2"],
            pgaudit_classes,
        ),
        c(
            "PG-LOG-09",
            Logging,
            "pgaudit does not log statement parameters",
            Medium,
            "pgaudit.log_parameter = off",
            &["guide: pgaudit"],
            pgaudit_parameters,
        ),
        c(
            "PG-LOG-10",
            Logging,
            "Server messages at warning level",
            Low,
            "log_min_messages = warning",
            &["CIS 3.1.14"],
            log_min_messages,
        ),
        c(
            "PG-LOG-11",
            Logging,
            "No query trees in the log",
            Low,
            "debug_print_parse, debug_print_rewritten, debug_print_plan = off",
            &["CIS 3.1.16-3.1.19"],
            debug_print,
        ),
        c(
            "PG-LOG-12",
            Logging,
            "Replication commands logged",
            Low,
            "log_replication_commands = on",
            &["CIS 7.2"],
            log_replication_commands,
        ),
        c(
            "PG-PAR-01",
            Parameters,
            "fsync on",
            Critical,
            "fsync = on",
            &["PostgreSQL docs: WAL reliability"],
            fsync,
        ),
        c(
            "PG-PAR-02",
            Parameters,
            "Full page writes on",
            High,
            "full_page_writes = on",
            &["PostgreSQL docs: WAL reliability"],
            full_page_writes,
        ),
        c(
            "PG-PAR-03",
            Parameters,
            "pg_rewind can run (checksums or wal_log_hints)",
            Medium,
            "wal_log_hints = on (pgkeep sets it) or data checksums",
            &["Patroni: use_pg_rewind"],
            rewind_possible,
        ),
        c(
            "PG-PAR-04",
            Parameters,
            "Data checksums on",
            Medium,
            "initdb --data-checksums (pg_checksums --enable on a stopped node)",
            &["CIS 1.4.3"],
            data_checksums,
        ),
        c(
            "PG-PAR-05",
            Parameters,
            "System catalogs cannot be modified",
            High,
            "allow_system_table_mods = off",
            &["CIS 6.2"],
            system_table_mods,
        ),
        c(
            "PG-PAR-06",
            Parameters,
            "System indexes used",
            Medium,
            "ignore_system_indexes = off",
            &["CIS 6.2"],
            system_indexes,
        ),
        c(
            "PG-PAR-07",
            Parameters,
            "Damaged pages are not hidden",
            High,
            "zero_damaged_pages = off, ignore_checksum_failure = off",
            &["PostgreSQL docs: developer options"],
            damaged_pages,
        ),
        c(
            "PG-PAR-08",
            Parameters,
            "Code loads from $libdir only",
            Medium,
            "dynamic_library_path = '$libdir'",
            &["CIS 8.3"],
            library_path,
        ),
        c(
            "PG-PAR-09",
            Parameters,
            "WAL archiving on",
            High,
            "archive_mode = on",
            &["CIS 7.4", "guide: pgBackRest"],
            archive_mode,
        ),
        c(
            "PG-PAR-10",
            Parameters,
            "WAL archived by pgBackRest",
            Medium,
            "archive_command = pgbackrest ... archive-push %p (local configuration)",
            &["guide: pgBackRest"],
            archive_command,
        ),
        c(
            "PG-PAR-11",
            Parameters,
            "Slots cannot fill the disk",
            Medium,
            "max_slot_wal_keep_size = a size the WAL disk can hold",
            &["PostgreSQL docs: replication slots"],
            slot_wal_keep,
        ),
        c(
            "PG-PAR-12",
            Parameters,
            "JIT debugging and profiling support off",
            Low,
            "jit_debugging_support = off, jit_profiling_support = off",
            &["CIS 6.2"],
            jit_support,
        ),
        c(
            "PG-PAR-13",
            Parameters,
            "No delay after authentication",
            Low,
            "post_auth_delay = 0",
            &["CIS 6.2"],
            post_auth_delay,
        ),
    ];
    v.extend([
        c(
            "PG-LOG-13",
            Logging,
            "Logs in UTC",
            Low,
            "log_timezone = 'UTC'",
            &["CIS 3.1.26"],
            log_timezone,
        ),
        c(
            "PG-PAR-14",
            Parameters,
            "Connections reserved for the superuser",
            Low,
            "superuser_reserved_connections = 3 or more (the agent connects as the superuser)",
            &["PostgreSQL docs: connections"],
            reserved_connections,
        ),
        c(
            "SYS-01",
            Files,
            "Data on encrypted storage",
            Medium,
            "put the data directory (and the repository) on a LUKS volume",
            &["CIS 1.4.5", "guide: TDE note"],
            encrypted_storage,
        ),
        c(
            "SYS-02",
            Parameters,
            "The running server is the installed version",
            Medium,
            "restart each node (replicas first, then a switchover) after a minor update",
            &["CIS 1.5", "guide: patch management"],
            running_installed_version,
        ),
    ]);
    v.extend(access::checks());
    v
}
