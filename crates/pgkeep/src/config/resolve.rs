//! From the file as written to the checked [`Config`]: defaults, conversions and the rules an
//! experienced DBA expects to be enforced before anything starts.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use pgkeep_core::cluster::Tags;
use pgkeep_core::dynamic::{self, DynamicError};
use pgkeep_core::ha::HaConfig;
use pgkeep_core::policy::{self, Admission, GucName, LocalOnlyReason};
use secrecy::SecretString;
use serde_json::Value;

use super::raw::{RawAuth, RawConfig, RawPgRole};
use super::{
    Application, BasicAuth, Bootstrap, Config, ConfigError, Ctl, Etcd, Insecure, Log, LogFormat,
    PgAuthentication, PgRole, Postgresql, RestApi, TlsFiles, VerifyClient, Watchdog, WatchdogMode,
};

/// Converts the parsed file into a checked configuration.
pub(super) fn resolve(file: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, key, reason);
    let mut inline_secret_keys = Vec::new();

    check_identifier(&raw.scope).map_err(|r| err("scope", r))?;
    check_identifier(&raw.name).map_err(|r| err("name", r))?;
    let namespace = raw.namespace.unwrap_or_else(|| "/service/".into());

    let raw_pgkeep = raw.pgkeep.unwrap_or_default();
    let raw_insecure = raw_pgkeep.insecure.unwrap_or_default();
    let insecure = Insecure {
        plaintext_restapi: raw_insecure.plaintext_restapi,
        plaintext_etcd: raw_insecure.plaintext_etcd,
        weak_pg_hba: raw_insecure.weak_pg_hba,
    };

    // REST API
    let r = raw.restapi;
    let listen = parse_socket(&r.listen).map_err(|e| err("restapi.listen", e))?;
    let tls = tls_pair(r.certfile, r.keyfile, "restapi.certfile", "restapi.keyfile")
        .map_err(|(k, e)| err(k, e))?;
    if tls.is_none() && !insecure.plaintext_restapi {
        return Err(err(
            "restapi.certfile",
            "the REST API needs a certificate (restapi.certfile and restapi.keyfile); \
             plaintext HTTP is refused unless pgkeep.insecure.plaintext_restapi is true"
                .into(),
        ));
    }
    let verify_client = r.verify_client.unwrap_or(if r.cafile.is_some() {
        VerifyClient::Optional
    } else {
        VerifyClient::None
    });
    if verify_client != VerifyClient::None && r.cafile.is_none() {
        return Err(err(
            "restapi.cafile",
            "verify_client needs a CA file to check client certificates against".into(),
        ));
    }
    let authentication = r
        .authentication
        .map(|a| basic_auth(file, a, "restapi.authentication", &mut inline_secret_keys))
        .transpose()?;
    let allowlist = r
        .allowlist
        .items()
        .iter()
        .enumerate()
        .map(|(i, s)| parse_net(s).map_err(|e| err(&format!("restapi.allowlist[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let restapi = RestApi {
        connect_address: r.connect_address.unwrap_or_else(|| r.listen.clone()),
        listen,
        tls,
        cafile: r.cafile,
        verify_client,
        authentication,
        allowlist,
        allowlist_include_members: r.allowlist_include_members,
        allowed_client_names: r.allowed_client_names.items(),
    };

    // Operator CLI
    let ctl = match raw.ctl {
        None => Ctl::default(),
        Some(c) => Ctl {
            client: tls_pair(c.certfile, c.keyfile, "ctl.certfile", "ctl.keyfile")
                .map_err(|(k, e)| err(k, e))?,
            cacert: c.cacert,
            authentication: c
                .authentication
                .map(|a| basic_auth(file, a, "ctl.authentication", &mut inline_secret_keys))
                .transpose()?,
        },
    };

    // etcd
    let e = raw.etcd3;
    let mut hosts = e.hosts.items();
    if let Some(h) = e.host {
        hosts.insert(0, h);
    }
    if hosts.is_empty() {
        return Err(err(
            "etcd3.hosts",
            "list at least one etcd endpoint (host:port)".into(),
        ));
    }
    let protocol = e.protocol.unwrap_or_else(|| "https".into());
    match protocol.as_str() {
        "https" => {}
        "http" if insecure.plaintext_etcd => {}
        "http" => {
            return Err(err(
                "etcd3.protocol",
                "plaintext etcd is refused; use https (or set pgkeep.insecure.plaintext_etcd)"
                    .into(),
            ));
        }
        other => {
            return Err(err(
                "etcd3.protocol",
                format!("{other:?} is neither https nor http"),
            ));
        }
    }
    let client = tls_pair(e.cert, e.key, "etcd3.cert", "etcd3.key").map_err(|(k, e)| err(k, e))?;
    if protocol == "https" && (e.cacert.is_none() || client.is_none()) {
        return Err(err(
            if e.cacert.is_none() {
                "etcd3.cacert"
            } else {
                "etcd3.cert"
            },
            "etcd is reached over mutual TLS: set etcd3.cacert, etcd3.cert and etcd3.key".into(),
        ));
    }
    let mut endpoints = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        if h.contains("://") {
            return Err(err(
                &format!("etcd3.hosts[{i}]"),
                "give host:port; the scheme comes from etcd3.protocol".into(),
            ));
        }
        if h.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(err(
                &format!("etcd3.hosts[{i}]"),
                format!("{h:?} is not host:port"),
            ));
        }
        endpoints.push(format!("{protocol}://{h}"));
    }
    let etcd = Etcd {
        endpoints,
        cacert: e.cacert,
        client,
    };

    let certificate_expiry_warning_days = match raw_pgkeep.certificate_expiry_warning_days {
        None => 30,
        Some(d) if (1..=3650).contains(&d) => d,
        Some(d) => {
            return Err(err(
                "pgkeep.certificate_expiry_warning_days",
                format!("{d} is out of range (1 to 3650)"),
            ));
        }
    };
    let pgbackrest = match raw_pgkeep.pgbackrest {
        None => None,
        Some(p) => {
            let config_path = match p.config_path {
                Some(c) if Path::new(&c).is_absolute() => PathBuf::from(c),
                Some(c) => {
                    return Err(err(
                        "pgkeep.pgbackrest.config_path",
                        format!("{c:?} is not an absolute path"),
                    ));
                }
                None => {
                    return Err(err(
                        "pgkeep.pgbackrest.config_path",
                        "missing: the directory of this node's pgbackrest.conf".into(),
                    ));
                }
            };
            let stanza = p.stanza.unwrap_or_else(|| raw.scope.clone());
            crate::pgbackrest::check_stanza(&stanza)
                .map_err(|e| err("pgkeep.pgbackrest.stanza", e.reason))?;
            Some(super::PgBackRest {
                config_path,
                stanza,
                replica_without_leader: p.replica_without_leader,
            })
        }
    };
    let mut dynamic_parameter_allowlist = BTreeSet::new();
    for (i, n) in raw_pgkeep.dynamic_parameter_allowlist.iter().enumerate() {
        let key = format!("pgkeep.dynamic_parameter_allowlist[{i}]");
        let name = GucName::parse(n).map_err(|e| err(&key, e.to_string()))?;
        let probe: BTreeSet<_> = [name.clone()].into();
        if let Admission::LocalOnly(reason) = policy::admission(&name, &probe) {
            debug_assert_ne!(reason, LocalOnlyReason::NotAllowlisted);
            return Err(err(
                &key,
                format!("{name} cannot be opened to dynamic configuration: {reason}"),
            ));
        }
        dynamic_parameter_allowlist.insert(name);
    }

    // Bootstrap
    let bootstrap = match raw.bootstrap {
        None => Bootstrap::default(),
        Some(b) => {
            let dcs = b.dcs.unwrap_or_default();
            // Every key of bootstrap.dcs must mean something to pgkeep: a key the policy would
            // drop (a typo, an unsupported Patroni option, a command) is a mistake in this file.
            let allow = &dynamic_parameter_allowlist;
            let checked = dynamic::read(&dcs, &HaConfig::default(), allow).and_then(|d| {
                // Unknown keys first: a typo is a better explanation than the timing error
                // that its default value causes.
                if d.dropped.is_empty() {
                    dynamic::interpret(&dcs, &HaConfig::default(), allow).map(|_| d)
                } else {
                    Ok(d)
                }
            });
            let key = match checked {
                Err(DynamicError::BadValue { key, reason }) => Some((key, reason)),
                Err(e @ DynamicError::Unsafe(_)) => Some(("ttl".to_owned(), e.to_string())),
                Ok(d) => d.dropped.into_iter().next().map(|k| {
                    let hint = if k.security {
                        "; set it in the local configuration instead of bootstrap.dcs"
                    } else {
                        ""
                    };
                    (k.path, format!("{}{hint}", k.reason))
                }),
            };
            if let Some((k, reason)) = key {
                return Err(err(&format!("bootstrap.dcs.{k}"), reason));
            }
            let initdb = b
                .initdb
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    initdb_option(v).map_err(|r| err(&format!("bootstrap.initdb[{i}]"), r))
                })
                .collect::<Result<_, _>>()?;
            let mut applications: Vec<Application> = Vec::new();
            for (i, a) in b.applications.into_iter().enumerate() {
                let key = format!("bootstrap.applications[{i}]");
                pgkeep_core::apps::valid_name(&a.name)
                    .map_err(|r| err(&format!("{key}.name"), r))?;
                if applications.iter().any(|x| x.name == a.name) {
                    return Err(err(
                        &format!("{key}.name"),
                        format!("{} is listed twice", a.name),
                    ));
                }
                let password = read_password_file(&a.password_file)
                    .map_err(|r| err(&format!("{key}.password_file"), r))?;
                let readonly_password = a
                    .readonly_password_file
                    .map(|f| read_password_file(&f))
                    .transpose()
                    .map_err(|r| err(&format!("{key}.readonly_password_file"), r))?;
                applications.push(Application {
                    name: a.name,
                    password,
                    readonly_password,
                });
            }
            Bootstrap {
                dcs,
                initdb,
                applications,
            }
        }
    };

    // PostgreSQL
    let p = raw.postgresql;
    let pg_listen = parse_socket(&p.listen).map_err(|e| err("postgresql.listen", e))?;
    if !p.data_dir.is_absolute() {
        return Err(err(
            "postgresql.data_dir",
            "must be an absolute path".into(),
        ));
    }
    let config_dir = p
        .config_dir
        .unwrap_or_else(|| default_config_dir(&p.data_dir));
    if config_dir.starts_with(&p.data_dir) {
        return Err(err(
            "postgresql.config_dir",
            "must be outside the data directory, so clones and rewinds never copy another node's configuration".into(),
        ));
    }
    let auth = p.authentication.unwrap_or_default();
    let authentication = PgAuthentication {
        superuser: pg_role(
            file,
            auth.superuser,
            "postgres",
            "postgresql.authentication.superuser",
            &mut inline_secret_keys,
        )?,
        replication: pg_role(
            file,
            auth.replication,
            "replicator",
            "postgresql.authentication.replication",
            &mut inline_secret_keys,
        )?,
        rewind: pg_role(
            file,
            auth.rewind,
            "rewind_user",
            "postgresql.authentication.rewind",
            &mut inline_secret_keys,
        )?,
    };
    let parameters = policy::check_local(&p.parameters.unwrap_or_default())
        .map_err(|e| err("postgresql.parameters", e.to_string()))?;
    for name in parameters.keys() {
        const MANAGED: &[&str] = &[
            "listen_addresses",
            "port",
            "cluster_name",
            "hot_standby",
            "data_directory",
            "config_file",
            "hba_file",
            "ident_file",
            "primary_conninfo",
            "primary_slot_name",
            "synchronous_standby_names",
            "standby_mode",
        ];
        if MANAGED.contains(&name.as_str()) || name.as_str().starts_with("recovery_target") {
            return Err(err(
                &format!("postgresql.parameters.{name}"),
                "pgkeep sets this itself (from postgresql.listen, the directories, and the cluster's state)".into(),
            ));
        }
    }
    for (i, line) in p.pg_hba.iter().enumerate() {
        let key = format!("postgresql.pg_hba[{i}]");
        super::hba::check_line(line, insecure.weak_pg_hba).map_err(|r| err(&key, r))?;
        if super::hba::has_secret(line) {
            inline_secret_keys.push(key);
        }
    }
    let ldap_ca_file = match p.ldap_ca_file {
        Some(f) => {
            check_ca_file(&f).map_err(|r| err("postgresql.ldap_ca_file", r))?;
            Some(f)
        }
        // The CA PostgreSQL already trusts (relative paths are PostgreSQL's: from the data
        // directory).
        None => GucName::parse("ssl_ca_file")
            .ok()
            .and_then(|n| parameters.get(&n))
            .map(|v| p.data_dir.join(v.as_str())),
    };
    let callbacks = super::callbacks::resolve(
        file,
        p.callbacks,
        p.pre_promote,
        p.before_stop,
        raw_pgkeep.callback_timeout,
        raw_pgkeep.callback_primary_role.as_deref(),
    )?;
    let postgresql = Postgresql {
        listen: pg_listen,
        connect_address: p.connect_address,
        data_dir: p.data_dir,
        config_dir,
        bin_dir: p.bin_dir,
        pgpass: p.pgpass,
        authentication,
        parameters,
        pg_hba: p.pg_hba,
        pg_ident: p.pg_ident,
        use_pg_rewind: p.use_pg_rewind.unwrap_or(true),
        pg_ctl_timeout: p.pg_ctl_timeout.unwrap_or(60),
        ldap_ca_file,
    };

    let raw_tags = raw.tags.unwrap_or_default();
    for (k, v) in &raw_tags {
        let ok = match k.as_str() {
            "nofailover" | "noloadbalance" | "nosync" | "clonefrom" | "nostream" => v.is_boolean(),
            "failover_priority" | "sync_priority" => v.is_i64(),
            "replicatefrom" => v.is_string(),
            _ => !v.is_object() && !v.is_array(),
        };
        if !ok {
            return Err(err(
                &format!("tags.{k}"),
                format!("{v} is not a valid value for this tag"),
            ));
        }
    }
    let tags: Tags =
        serde_json::from_value(Value::Object(raw_tags)).map_err(|e| err("tags", e.to_string()))?;

    let w = raw.watchdog;
    let watchdog = Watchdog {
        mode: w
            .as_ref()
            .and_then(|w| w.mode)
            .unwrap_or(WatchdogMode::Automatic),
        device: w
            .as_ref()
            .and_then(|w| w.device.clone())
            .unwrap_or_else(|| "/dev/watchdog".into()),
        safety_margin: w.as_ref().and_then(|w| w.safety_margin).unwrap_or(5),
    };
    let log = Log {
        level: raw
            .log
            .as_ref()
            .and_then(|l| l.level.clone())
            .unwrap_or_else(|| "info".into()),
        format: raw
            .log
            .as_ref()
            .and_then(|l| l.format)
            .unwrap_or(LogFormat::Text),
    };
    // A bare word must be a level: tracing would read `LOUD` as a target name and log nothing.
    let levels = ["trace", "debug", "info", "warn", "error", "off"];
    let bad_word = !log.level.contains(['=', ','])
        && !levels.contains(&log.level.to_ascii_lowercase().as_str());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            if bad_word {
                Err(format!("use one of {}", levels.join(", ")))
            } else {
                Ok(())
            }
        })
    {
        return Err(err(
            "log.level",
            format!("{:?} is not a log level or filter: {e}", log.level),
        ));
    }

    let mut cluster_networks = raw_pgkeep
        .cluster_networks
        .iter()
        .enumerate()
        .map(|(i, s)| parse_net(s).map_err(|e| err(&format!("pgkeep.cluster_networks[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    if cluster_networks.is_empty() {
        // Without a list, only this host: enough for a single-host test bed. On loopback every
        // connection's source address is 127.0.0.1, whichever 127.x address it targets.
        cluster_networks.push(IpNet::from(postgresql.listen.ip()));
        if postgresql.listen.ip().is_loopback() {
            cluster_networks
                .push(parse_net("127.0.0.0/8").map_err(|e| err("pgkeep.cluster_networks", e))?);
        }
    }

    Ok(Config {
        source: file.to_owned(),
        scope: raw.scope,
        namespace,
        name: raw.name,
        restapi,
        ctl,
        etcd,
        bootstrap,
        postgresql,
        tags,
        watchdog,
        log,
        dynamic_parameter_allowlist,
        certificate_expiry_warning_days,
        pgbackrest,
        cluster_networks,
        insecure,
        callbacks,
        inline_secret_keys,
    })
}

fn check_identifier(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be 1-63 characters of letters, digits, '_', '-' and '.'"
        ))
    }
}

fn parse_socket(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an address:port (for example 127.0.0.1:8443 or [::1]:8443)")
    })
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))
}

type KeyedError = (&'static str, String);

fn tls_pair(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    cert_key: &'static str,
    key_key: &'static str,
) -> Result<Option<TlsFiles>, KeyedError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err((
            key_key,
            format!("{cert_key} is set, so this must be set too"),
        )),
        (None, Some(_)) => Err((
            cert_key,
            format!("{key_key} is set, so this must be set too"),
        )),
    }
}

fn secret(
    file: &Path,
    password: Option<String>,
    password_file: Option<PathBuf>,
    key: &str,
    inline: &mut Vec<String>,
) -> Result<Option<SecretString>, ConfigError> {
    match (password, password_file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            file,
            key,
            "set password or password_file, not both",
        )),
        (Some(p), None) => {
            inline.push(format!("{key}.password"));
            Ok(Some(SecretString::from(p)))
        }
        (None, Some(pf)) => read_password_file(&pf)
            .map(Some)
            .map_err(|r| ConfigError::new(file, format!("{key}.password_file"), r)),
        (None, None) => Ok(None),
    }
}

fn read_password_file(path: &Path) -> Result<SecretString, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if crate::fsutil::readable_by_others(&meta) {
        return Err(format!(
            "{} is readable by group or others; run `chmod 600` on it",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

fn basic_auth(
    file: &Path,
    a: RawAuth,
    key: &str,
    inline: &mut Vec<String>,
) -> Result<BasicAuth, ConfigError> {
    let password = secret(file, a.password, a.password_file, key, inline)?
        .ok_or_else(|| ConfigError::new(file, key, "needs password or password_file"))?;
    if a.username.is_empty() || a.username.contains(':') {
        return Err(ConfigError::new(
            file,
            format!("{key}.username"),
            "must be non-empty and contain no ':'",
        ));
    }
    Ok(BasicAuth {
        username: a.username,
        password,
    })
}

fn pg_role(
    file: &Path,
    raw: Option<RawPgRole>,
    default_user: &str,
    key: &str,
    inline: &mut Vec<String>,
) -> Result<PgRole, ConfigError> {
    let r = raw.unwrap_or_default();
    let username = r.username.unwrap_or_else(|| default_user.to_owned());
    check_identifier(&username)
        .map_err(|e| ConfigError::new(file, format!("{key}.username"), e))?;
    let sslmode = r.sslmode.unwrap_or_else(|| "verify-full".into());
    if !matches!(sslmode.as_str(), "verify-full" | "verify-ca") {
        return Err(ConfigError::new(
            file,
            format!("{key}.sslmode"),
            format!("{sslmode:?} does not verify the server; use verify-full (or verify-ca)"),
        ));
    }
    let client = tls_pair(r.sslcert, r.sslkey, "sslcert", "sslkey")
        .map_err(|(k, e)| ConfigError::new(file, format!("{key}.{k}"), e))?;
    Ok(PgRole {
        username,
        password: secret(file, r.password, r.password_file, key, inline)?,
        sslmode,
        client,
        sslrootcert: r.sslrootcert,
    })
}

/// One `bootstrap.initdb` entry: `flag` or `{option: value}`, as Patroni writes them.
fn initdb_option(v: &Value) -> Result<String, String> {
    let (name, value) = match v {
        Value::String(s) => (s.clone(), None),
        Value::Object(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().ok_or("empty option")?;
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(format!("the value of {k} must be a scalar")),
            };
            (k.clone(), Some(v))
        }
        _ => return Err("expected an option name or a one-key mapping".into()),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("{name:?} is not an initdb option name"));
    }
    // An allowlist: initdb accepts unambiguous prefixes of its long options, so a deny-list of
    // full names (auth, pwfile, pgdata, ...) could be bypassed with `pwf` or `pgd`.
    const ALLOWED: &[&str] = &[
        "encoding",
        "locale",
        "lc-collate",
        "lc-ctype",
        "lc-messages",
        "lc-monetary",
        "lc-numeric",
        "lc-time",
        "no-locale",
        "locale-provider",
        "icu-locale",
        "icu-rules",
        "text-search-config",
        "wal-segsize",
    ];
    if !ALLOWED.contains(&name.as_str()) {
        return Err(format!(
            "{name} is not an initdb option pgkeep passes on (allowed: {}); authentication, paths and checksums are pgkeep's",
            ALLOWED.join(", ")
        ));
    }
    if value
        .as_deref()
        .is_some_and(|v| v.chars().any(char::is_control))
    {
        return Err(format!("the value of {name} contains a control character"));
    }
    Ok(match value {
        None => format!("--{name}"),
        Some(v) => format!("--{name}={v}"),
    })
}

/// `postgresql.ldap_ca_file`: an absolute path to a readable file holding PEM certificates.
fn check_ca_file(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "{}: {e}; it must be a file this user can read, holding the PEM certificate of the CA \
             that issued the LDAP server's certificate",
            path.display()
        )
    })?;
    if !text
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

fn default_config_dir(data_dir: &Path) -> PathBuf {
    let base = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    data_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{base}.conf"))
}
