//! etcd for a pgkeep cluster: each member's command line ([`member_args`], what `pgkeep up`
//! starts members with) and the document `pgkeep render etcd` prints ([`render`]): those command
//! lines, then the access control of [`crate::dcs::access`] as an idempotent `etcdctl` script.
//!
//! Pure: nothing is read; paths are only written into the text. Passwords never appear: the
//! script reads each from its file on standard input (`etcdctl user add --interactive=false`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::dcs::access::{self, AccessError, Credential, Plan};
use crate::inventory::{EtcdHost, Inventory};
use crate::pki::ETCD_CLIENT_CN_PREFIX;

/// The etcd server binary (Debian's etcd-server).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// Backend quota: 256 MiB, explicit rather than etcd's default.
pub const QUOTA_BACKEND_BYTES: u64 = 256 * 1024 * 1024;
/// Who `patronictl` logs in as: `patronictl@<cluster>`.
pub const PATRONICTL: &str = "patronictl";

/// A member's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFiles {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The member's `etcd-server` certificate (client and peer TLS).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The cluster CA, the only trust anchor for clients and peers.
    pub ca: PathBuf,
}

/// How members are started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberOptions {
    /// `--initial-cluster-token` (a member of another cluster cannot join).
    pub cluster_token: String,
    /// Every member on loopback: each connection's source address is 127.0.0.1, so etcd's
    /// check of a peer certificate's addresses against it cannot pass and is turned off (the
    /// chain is still verified, servers are still checked by name).
    pub loopback: bool,
}

/// The command-line flags of member `m` (without the program).
///
/// Client and peer TLS with the cluster CA as the only anchor, client certificates required on
/// both (`--client-cert-auth`: a gRPC client certificate's common name is its etcd user),
/// pre-vote, hourly compaction, an explicit quota, the v2 API off, and the JSON gateway on
/// (etcd 3.4's default, named so it stays on: `patronictl` reaches etcd only through it).
pub fn member_args(
    inv: &Inventory,
    m: &EtcdHost,
    files: &MemberFiles,
    opts: &MemberOptions,
) -> Vec<String> {
    let url = |port: u16| format!("https://{}:{port}", inv.fqdn(&m.name));
    let listen = |port: u16| match m.address {
        std::net::IpAddr::V6(a) => format!("https://[{a}]:{port}"),
        a => format!("https://{a}:{port}"),
    };
    let initial_cluster = inv
        .etcd_hosts
        .iter()
        .map(|e| format!("{}=https://{}:{}", e.name, inv.fqdn(&e.name), e.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    let (ca, cert, key) = (
        files.ca.display(),
        files.cert.display(),
        files.key.display(),
    );
    let mut args = vec![
        format!("--name={}", m.name),
        format!("--data-dir={}", files.data_dir.display()),
        format!("--listen-client-urls={}", listen(m.client_port)),
        format!("--advertise-client-urls={}", url(m.client_port)),
        format!("--listen-peer-urls={}", listen(m.peer_port)),
        format!("--initial-advertise-peer-urls={}", url(m.peer_port)),
        format!("--initial-cluster={initial_cluster}"),
        // Ignored once the member has data.
        format!("--initial-cluster-token={}", opts.cluster_token),
        "--initial-cluster-state=new".into(),
        "--client-cert-auth=true".into(),
        format!("--trusted-ca-file={ca}"),
        format!("--cert-file={cert}"),
        format!("--key-file={key}"),
        "--peer-client-cert-auth=true".into(),
        format!("--peer-trusted-ca-file={ca}"),
        format!("--peer-cert-file={cert}"),
        format!("--peer-key-file={key}"),
    ];
    if opts.loopback {
        args.push("--experimental-peer-skip-client-san-verification=true".into());
    }
    args.extend(
        [
            "--pre-vote=true",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ]
        .map(String::from),
    );
    args.push(format!("--quota-backend-bytes={QUOTA_BACKEND_BYTES}"));
    args.extend(
        [
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--enable-v2=false",
            "--enable-grpc-gateway=true",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        .map(String::from),
    );
    args
}

/// The users and roles of `inv`'s cluster: each database host's agent (`pgkeep-<host>`) and
/// each operator (`pgkeep-<operator>`) read and write the cluster's prefix with their
/// `etcd-client` certificates; `patronictl@<cluster>` reads it with a password.
pub fn cluster_plan(inv: &Inventory, operators: &[String]) -> Result<Plan, AccessError> {
    let mut cert_users: Vec<(String, String)> = inv
        .database_hosts
        .iter()
        .map(|h| {
            (
                format!("{ETCD_CLIENT_CN_PREFIX}{}", h.name),
                format!("agent of {}", h.name),
            )
        })
        .collect();
    cert_users.extend(operators.iter().map(|o| {
        (
            format!("{ETCD_CLIENT_CN_PREFIX}{o}"),
            format!("operator (pgkeep ctl), certificate etcd-client-{o}"),
        )
    }));
    let readonly = vec![(
        access::password_user(PATRONICTL, &inv.cluster),
        "patronictl, through the JSON gateway".to_owned(),
    )];
    let mut plan = Plan::cluster(&inv.namespace, &inv.cluster, &cert_users, &readonly)?;
    // The backup scheduler on the repository host only reads the cluster (who is primary).
    if let Some(b) = &inv.backup_host {
        plan.users.push(access::User {
            name: format!("{ETCD_CLIENT_CN_PREFIX}{}", b.name),
            credential: access::Credential::Certificate,
            roles: vec![access::role_name(&inv.cluster, access::Access::ReadOnly)],
            about: format!(
                "backup scheduler on {}, certificate etcd-client-{}, read only",
                b.name, b.name
            ),
        });
    }
    Ok(plan)
}

/// Where `etcdctl` finds what the access script needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessFiles {
    /// The cluster CA.
    pub ca: PathBuf,
    /// The `etcd-root` certificate (CN `root`).
    pub root_cert: PathBuf,
    /// Its key.
    pub root_key: PathBuf,
    /// Each password user's password file.
    pub password_files: BTreeMap<String, PathBuf>,
}

/// What [`render`] prints.
#[derive(Debug, Clone)]
pub struct Document<'a> {
    /// The cluster.
    pub inv: &'a Inventory,
    /// Each member and its flags ([`member_args`]).
    pub members: Vec<(&'a EtcdHost, Vec<String>)>,
    /// The OS user members run as.
    pub member_user: String,
    /// Users and roles.
    pub plan: &'a Plan,
    /// The script's files.
    pub files: AccessFiles,
}

/// `s` as one shell word: unchanged when plain, else in single quotes.
pub fn sh(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'.' | b'/' | b'-' | b':' | b'@' | b',' | b'=' | b'+'
                )
        });
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

const HELPERS: &str = r#"
# A password file must exist, hold the password (its first word), and be private.
password_file() {
    if [ ! -s "$1" ]; then
        echo "$1 is missing or empty: write the password into it first (umask 077)" >&2
        exit 1
    fi
    case "$(stat -c %a "$1")" in
        600 | 400) ;;
        *) echo "$1 must be mode 0600 (chmod 600 $1)" >&2; exit 1 ;;
    esac
}
# Each step adds only what is missing, so the script can run again.
role() { etcdctl role get "$1" >/dev/null 2>&1 || etcdctl role add "$1"; }
certificate_user() { etcdctl user get "$1" >/dev/null 2>&1 || etcdctl user add "$1" --no-password; }
password_user() {
    password_file "$2"
    etcdctl user get "$1" >/dev/null 2>&1 || etcdctl user add "$1" --interactive=false <"$2"
}
"#;

/// The whole document: a POSIX shell script whose comments give each member's command line and
/// the access model, and whose commands set up users, roles and authentication.
pub fn render(doc: &Document<'_>) -> String {
    let inv = doc.inv;
    let prefix = access::cluster_prefix(&inv.namespace, &inv.cluster);
    let mut out = String::new();
    let _ = writeln!(out, "#!/bin/sh");
    let _ = writeln!(
        out,
        "# etcd for the pgkeep cluster {} ({} members; its keys are under {prefix}),",
        inv.cluster,
        doc.members.len()
    );
    out.push_str("# rendered by `pgkeep render etcd`.\n#\n# == Members ==\n#\n");
    out.push_str(
        "# TLS on client and peer ports with the cluster CA as the only anchor and client\n\
         # certificates required on both (--client-cert-auth: a gRPC client certificate's common\n\
         # name is its etcd user), pre-vote, hourly compaction, a 256 MiB quota, the v2 API off, and\n\
         # the JSON gateway on: patronictl reaches etcd only through it. Once authentication is on,\n\
         # the gateway refuses any client certificate that has a common name, so gateway clients\n\
         # present an etcd-gateway certificate (no common name) and log in with a password.\n\
         # Tokens: etcd's default simple tokens. Not JWT: after any change of users or roles a JWT\n\
         # is refused as \"revision of auth store is old\", which Patroni 3.0.2 does not renew.\n#\n",
    );
    for (m, args) in &doc.members {
        let _ = writeln!(
            out,
            "# {} ({}, {}), as the {} user:",
            m.name,
            inv.fqdn(&m.name),
            m.address,
            doc.member_user
        );
        let _ = write!(out, "#   {ETCD_BIN}");
        for a in args {
            let _ = write!(out, " \\\n#     {}", sh(a));
        }
        out.push_str("\n#\n");
    }
    out.push_str("# == Users and roles ==\n#\n");
    for r in &doc.plan.roles {
        let _ = writeln!(
            out,
            "# role {:<26} {} {}",
            r.name,
            r.access.describe(),
            r.prefix
        );
    }
    let _ = writeln!(
        out,
        "# user {:<26} certificate CN root, no password; user and role management only",
        access::ROOT
    );
    for u in &doc.plan.users {
        let how = match u.credential {
            Credential::Certificate => "certificate",
            Credential::Password => "password",
        };
        let _ = writeln!(
            out,
            "# user {:<26} {how}, {}: {}",
            u.name,
            u.roles.join(", "),
            u.about
        );
    }
    out.push_str(
        "#\n# Only the etcd-client (pgkeep-*) and etcd-root (root) certificates name etcd users; a\n\
         # certificate issued for anything else is no etcd identity, and a password user's name has\n\
         # an '@' no certificate pgkeep issues can carry. A read-write patronictl (edit-config) needs\n\
         # its own password user: a password_user line below with the role without .readonly (in a\n\
         # local environment: pgkeep etcd grant --dir D --scope SCOPE --user NAME@SCOPE\n\
         # --password-file F).\n#\n\
         # Run as root where the root certificate is, once every member runs. Passwords are read\n\
         # from their files, never given on a command line.\n",
    );
    out.push_str("set -eu\nexport ETCDCTL_API=3\n");
    let endpoints: Vec<String> = inv
        .etcd_endpoints()
        .iter()
        .map(|e| format!("https://{e}"))
        .collect();
    let f = &doc.files;
    let _ = writeln!(out, "export ETCDCTL_ENDPOINTS={}", sh(&endpoints.join(",")));
    let _ = writeln!(
        out,
        "export ETCDCTL_CACERT={}",
        sh(&f.ca.display().to_string())
    );
    let _ = writeln!(
        out,
        "export ETCDCTL_CERT={}",
        sh(&f.root_cert.display().to_string())
    );
    let _ = writeln!(
        out,
        "export ETCDCTL_KEY={}",
        sh(&f.root_key.display().to_string())
    );
    out.push_str(HELPERS);
    out.push_str(
        "\n# root: etcd's administrator, for user and role management only; its certificate is its\n\
         # only credential.\ncertificate_user root\netcdctl user grant-role root root\n",
    );
    for r in &doc.plan.roles {
        let _ = writeln!(
            out,
            "\n# {}: {} every key under {}.\nrole {}\netcdctl role grant-permission {} --prefix=true {} {}",
            r.name,
            r.access.describe(),
            r.prefix,
            sh(&r.name),
            sh(&r.name),
            r.access.etcdctl_word(),
            sh(&r.prefix)
        );
    }
    for u in &doc.plan.users {
        let _ = writeln!(out, "\n# {}: {}.", u.name, u.about);
        match u.credential {
            Credential::Certificate => {
                let _ = writeln!(out, "certificate_user {}", sh(&u.name));
            }
            Credential::Password => {
                let file = f.password_files.get(&u.name).map_or_else(
                    || format!("/etc/etcd/pgkeep/{}.pw", u.name),
                    |p| p.display().to_string(),
                );
                let _ = writeln!(out, "password_user {} {}", sh(&u.name), sh(&file));
            }
        }
        for r in &u.roles {
            let _ = writeln!(out, "etcdctl user grant-role {} {}", sh(&u.name), sh(r));
        }
    }
    out.push_str(
        "\n# Last: from here on etcd refuses every request its user's roles do not allow.\n\
         etcdctl auth enable\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::test_inventory;
    use std::path::Path;

    fn files(m: &str) -> MemberFiles {
        MemberFiles {
            data_dir: PathBuf::from(format!("/var/lib/etcd/{m}")),
            cert: PathBuf::from(format!("/etc/etcd/pgkeep/etcd-server-{m}.crt")),
            key: PathBuf::from(format!("/etc/etcd/pgkeep/etcd-server-{m}.key")),
            ca: PathBuf::from("/etc/etcd/pgkeep/ca.crt"),
        }
    }

    #[test]
    fn member_flags_require_client_certificates_and_keep_the_gateway() {
        let inv = test_inventory();
        let m = &inv.etcd_hosts[0];
        let opts = MemberOptions {
            cluster_token: "pgkeep-demo".into(),
            loopback: false,
        };
        let args = member_args(&inv, m, &files("etcd1"), &opts);
        for want in [
            "--client-cert-auth=true",
            "--peer-client-cert-auth=true",
            "--trusted-ca-file=/etc/etcd/pgkeep/ca.crt",
            "--enable-grpc-gateway=true",
            "--enable-v2=false",
            "--listen-client-urls=https://127.42.5.21:22379",
            "--advertise-client-urls=https://etcd1.demo.internal:22379",
            "--initial-cluster=etcd1=https://etcd1.demo.internal:22380",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a.contains("skip-client-san")));
        assert!(args.iter().all(|a| !a.starts_with("--auth-token")));
        let local = member_args(
            &inv,
            m,
            &files("etcd1"),
            &MemberOptions {
                loopback: true,
                ..opts
            },
        );
        assert!(local.iter().any(|a| a.contains("skip-client-san")));
    }

    fn document(inv: &Inventory, plan: &Plan) -> String {
        let members = inv
            .etcd_hosts
            .iter()
            .map(|m| {
                let opts = MemberOptions {
                    cluster_token: "t".into(),
                    loopback: false,
                };
                (m, member_args(inv, m, &files(&m.name), &opts))
            })
            .collect();
        let user = access::password_user(PATRONICTL, &inv.cluster);
        render(&Document {
            inv,
            members,
            member_user: "etcd".into(),
            plan,
            files: AccessFiles {
                ca: PathBuf::from("/etc/etcd/pgkeep/ca.crt"),
                root_cert: PathBuf::from("/etc/etcd/pgkeep/etcd-root-admin.crt"),
                root_key: PathBuf::from("/etc/etcd/pgkeep/etcd-root-admin.key"),
                password_files: BTreeMap::from([(
                    user,
                    Path::new("/etc/etcd/pgkeep/patronictl.pw").to_owned(),
                )]),
            },
        })
    }

    #[test]
    fn the_script_sets_up_least_privilege_and_enables_auth_last() {
        let inv = test_inventory();
        let plan = cluster_plan(&inv, &["operator".to_owned()]).unwrap();
        let text = document(&inv, &plan);
        assert!(text.starts_with("#!/bin/sh\n"));
        for want in [
            "export ETCDCTL_CERT=/etc/etcd/pgkeep/etcd-root-admin.crt\n",
            "export ETCDCTL_ENDPOINTS=https://etcd1.demo.internal:22379\n",
            "certificate_user root\netcdctl user grant-role root root\n",
            "role pgkeep-demo\netcdctl role grant-permission pgkeep-demo --prefix=true readwrite /service/demo/\n",
            "etcdctl role grant-permission pgkeep-demo.readonly --prefix=true read /service/demo/\n",
            "certificate_user pgkeep-node1\netcdctl user grant-role pgkeep-node1 pgkeep-demo\n",
            "certificate_user pgkeep-operator\netcdctl user grant-role pgkeep-operator pgkeep-demo\n",
            "password_user patronictl@demo /etc/etcd/pgkeep/patronictl.pw\n\
             etcdctl user grant-role patronictl@demo pgkeep-demo.readonly\n",
            "#     --client-cert-auth=true \\\n",
            "#     --enable-grpc-gateway=true \\\n",
            "--interactive=false <\"$2\"",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        // Authentication goes on after every user and role exists.
        let enable = text.find("etcdctl auth enable").unwrap();
        assert!(text.rfind("grant-role").unwrap() < enable);
        assert!(text.trim_end().ends_with("etcdctl auth enable"));
        // No password on any command line, and no agent with root.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            for bad in ["--new-user-password", "--password", "--user"] {
                assert!(!l.contains(bad), "{l}");
            }
        }
        assert!(!text.contains("grant-role pgkeep-node1 root"));
        // Every command line is a comment: the script starts no member.
        assert!(text.lines().all(|l| !l.starts_with("/usr/bin/etcd")));
    }

    #[test]
    fn shell_words() {
        assert_eq!(sh("/service/demo/"), "/service/demo/");
        assert_eq!(sh("patronictl@demo"), "patronictl@demo");
        assert_eq!(sh("a b"), "'a b'");
        assert_eq!(sh("it's"), r"'it'\''s'");
        assert_eq!(sh(""), "''");
        assert_eq!(sh("$(x)"), "'$(x)'");
    }
}
