//! `pgkeep pki`: create a CA, issue certificates, show a certificate.
//!
//! ```text
//! pgkeep pki init  --dir D [--cn NAME] [--days N] [--force]
//! pgkeep pki init  --dir D --ca-cert FILE --ca-key FILE [--force]
//! pgkeep pki issue --dir D --service S --name N [--host H]... [--ip A]... [--role R] [--days N]
//!                  [--ca-cert FILE --ca-key FILE] [--force]
//! pgkeep pki show  FILE [--format text|json]
//! pgkeep pki rotate --dir D [--service S]... [--days N] [--timeout SECS]
//! ```
//!
//! Parsing and presentation only; the work is done by [`crate::pki`].

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand, ValueEnum};

use crate::pki::{
    self, CA_CERT_FILE, CA_KEY_FILE, Ca, CertInfo, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, Service,
    ServiceCert,
};

/// Certificate authority and certificates.
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// The `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA in a directory, or adopt an organisation's CA.
    Init(InitArgs),
    /// Issue a server or client certificate for one service on one node.
    Issue(IssueArgs),
    /// Show a certificate: names, validity, days left, usages, SANs.
    Show(ShowArgs),
    /// Renew the certificates of a local environment (`pgkeep up`'s directory) from its CA and
    /// make every running component use them: no restart of PostgreSQL, no failover.
    Rotate(RotateArgs),
}

/// `pki rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The environment directory of `pgkeep up` (not its pki/ subdirectory).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Only the certificates of this service (repeatable or comma-separated) [default: all].
    #[arg(long = "service", value_name = "SERVICE", value_delimiter = ',', value_parser = service_parser())]
    pub services: Vec<Service>,
    /// Validity of the new certificates in days [default: 397, or fewer if the CA expires
    /// sooner].
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
    /// How long each component may take to present its new certificate, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Roll the CA over: a new CA trusted beside the old one by every component, then every
    /// certificate issued again by it. End the rollover with --ca --finish.
    #[arg(long, conflicts_with = "services")]
    pub ca: bool,
    /// With --ca: stop trusting the old CA (refused while a certificate of it is in use).
    #[arg(long, requires = "ca")]
    pub finish: bool,
}

/// `pki init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// PKI directory; receives ca.crt (0644) and ca.key (0600). Created if missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Common name of the new CA.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "pgkeep CA",
        conflicts_with = "ca_cert"
    )]
    pub cn: String,
    /// Validity of the new CA in days.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CA_DAYS, conflicts_with = "ca_cert")]
    pub days: u32,
    /// Replace an existing CA in DIR (certificates it signed will no longer verify).
    #[arg(long)]
    pub force: bool,
    /// Adopt an organisation's CA certificate instead of creating one: it is checked against
    /// --ca-key and copied to DIR/ca.crt. The key is not copied; pass both to `pki issue`.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The organisation CA's private key (PEM, not readable by group or others).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
}

/// `pki issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// PKI directory: the CA (DIR/ca.crt, DIR/ca.key) unless --ca-cert/--ca-key are given, and
    /// where <service>-<name>.crt (0644) and .key (0600) are written.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The service the certificate is for; it fixes the usage and the common name.
    #[arg(long, value_name = "SERVICE", value_parser = service_parser())]
    pub service: Service,
    /// Node or member name (letters, digits, '-', '_', '.').
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// A DNS name clients use for this server (repeatable or comma-separated); include the
    /// load balancer's name where clients connect through it.
    #[arg(long = "host", value_name = "HOST", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// An IP address clients use for this server (repeatable or comma-separated).
    #[arg(long = "ip", value_name = "ADDR", value_delimiter = ',')]
    pub ips: Vec<IpAddr>,
    /// PostgreSQL role for `replication` (default replicator) and `rewind` (default rewind_user).
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Validity in days [default: 397, or fewer if the CA expires sooner]. An explicit value
    /// that would outlive the CA is an error.
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
    /// Sign with this CA certificate (e.g. an organisation's) instead of DIR/ca.crt.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The key of --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Replace an existing certificate and key of the same name.
    #[arg(long)]
    pub force: bool,
}

/// `pki show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A PEM certificate file (the first certificate of a bundle is shown).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Output format of `pki show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned `key: value` lines.
    Text,
    /// One JSON object.
    Json,
}

fn service_parser() -> impl TypedValueParser<Value = Service> {
    PossibleValuesParser::new(
        Service::ALL.map(|s| PossibleValue::new(s.as_str()).help(s.description())),
    )
    .try_map(|s| s.parse::<Service>())
}

/// Runs a `pgkeep pki` command, printing to standard output.
pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_with_output(args, &mut out)
}

/// Runs a `pgkeep pki` command, printing to `out`.
pub fn run_with_output(args: PkiArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        PkiCommand::Init(a) => init(a, out),
        PkiCommand::Issue(a) => issue(a, out),
        PkiCommand::Show(a) => show(a, out),
        PkiCommand::Rotate(a) => {
            let opts = crate::local::rotate::RotateOptions {
                dir: a.dir,
                services: a.services,
                days: a.days,
                timeout: std::time::Duration::from_secs(a.timeout.max(1)),
            };
            match (a.ca, a.finish) {
                (true, true) => crate::local::rotate_ca::finish(&opts),
                (true, false) => crate::local::rotate_ca::start(&opts),
                _ => crate::local::rotate::rotate(&opts),
            }
        }
    }
}

fn init(args: InitArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let cert_path = args.dir.join(CA_CERT_FILE);
    let key_path = args.dir.join(CA_KEY_FILE);
    // Adopting an organisation CA whose files already are DIR/ca.crt and DIR/ca.key replaces
    // nothing.
    let is_input = |p: &Path| {
        [&args.ca_cert, &args.ca_key]
            .into_iter()
            .flatten()
            .any(|input| same_file(p, input))
    };
    if !args.force {
        for existing in [&key_path, &cert_path] {
            if existing.exists() && !is_input(existing) {
                bail!(
                    "{} already exists; refusing to replace the CA (every certificate it signed \
                     would stop verifying). Use --force to replace it",
                    existing.display()
                );
            }
        }
    }

    if let (Some(org_cert), Some(org_key)) = (&args.ca_cert, &args.ca_key) {
        let ca = Ca::load(org_cert, org_key).with_context(|| {
            format!(
                "pki init: cannot use the organisation CA {} with key {}",
                org_cert.display(),
                org_key.display()
            )
        })?;
        if !same_file(&cert_path, org_cert) {
            ca.write_cert(&cert_path).with_context(|| {
                format!(
                    "pki init: cannot install the CA certificate into {}",
                    args.dir.display()
                )
            })?;
        }
        let mut removed_key = false;
        if key_path.exists() && !same_file(&key_path, org_key) {
            // --force was given (checked above): a stale key would not match the new ca.crt.
            std::fs::remove_file(&key_path).with_context(|| {
                format!("pki init: cannot remove the old {}", key_path.display())
            })?;
            removed_key = true;
        }
        writeln!(out, "adopted organisation CA {:?}", ca.common_name())?;
        writeln!(
            out,
            "  certificate: {} (copied from {})",
            cert_path.display(),
            org_cert.display()
        )?;
        writeln!(out, "  key:         {} (not copied)", org_key.display())?;
        if removed_key {
            writeln!(out, "  removed the previous {}", key_path.display())?;
        }
        writeln!(out, "  valid until: {}", pki::format_time(ca.not_after()))?;
        writeln!(
            out,
            "issue certificates with: pgkeep pki issue --dir {} --ca-cert {} --ca-key {} ...",
            args.dir.display(),
            org_cert.display(),
            org_key.display()
        )?;
        return Ok(());
    }

    let ca = Ca::create(&args.cn, args.days).context("pki init: cannot create the CA")?;
    let files = ca
        .write(&args.dir)
        .with_context(|| format!("pki init: cannot write the CA into {}", args.dir.display()))?;
    writeln!(out, "created CA {:?}", ca.common_name())?;
    writeln!(out, "  certificate: {} (0644)", files.cert.display())?;
    writeln!(out, "  key:         {} (0600)", files.key.display())?;
    writeln!(
        out,
        "  valid:       {} to {} ({} days)",
        pki::format_time(ca.not_before()),
        pki::format_time(ca.not_after()),
        args.days
    )?;
    Ok(())
}

fn issue(args: IssueArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (ca_cert, ca_key) = match (&args.ca_cert, &args.ca_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let (c, k) = (args.dir.join(CA_CERT_FILE), args.dir.join(CA_KEY_FILE));
            if !k.exists() {
                bail!(
                    "pki issue: no CA key at {}; run `pgkeep pki init --dir {}` first, or pass \
                     --ca-cert/--ca-key to sign with an organisation CA",
                    k.display(),
                    args.dir.display()
                );
            }
            (c, k)
        }
    };
    let spec = ServiceCert {
        service: args.service,
        name: args.name.clone(),
        role: args.role.clone(),
        dns_names: args.hosts.clone(),
        ip_addresses: args.ips.clone(),
        validity_days: args.days.unwrap_or(DEFAULT_LEAF_DAYS),
    };
    let mut request = spec.request().with_context(|| {
        format!(
            "pki issue: cannot issue a {} certificate for {:?}",
            args.service, args.name
        )
    })?;
    let basename = spec.basename()?;
    let (cert_path, key_path) = (
        args.dir.join(format!("{basename}.crt")),
        args.dir.join(format!("{basename}.key")),
    );
    if !args.force {
        for existing in [&key_path, &cert_path] {
            if existing.exists() {
                bail!(
                    "{} already exists; use --force to replace it (re-issuing rotates the key)",
                    existing.display()
                );
            }
        }
    }

    let ca = Ca::load(&ca_cert, &ca_key).with_context(|| {
        format!(
            "pki issue: cannot load the CA from {} and {}",
            ca_cert.display(),
            ca_key.display()
        )
    })?;
    let mut shortened = false;
    if args.days.is_none() {
        // The default adapts to a CA near the end of its life; an explicit --days does not.
        let left = (ca.not_after() - time::OffsetDateTime::now_utc()).whole_days();
        if left < i64::from(request.validity_days) {
            request.validity_days = u32::try_from(left.max(1)).unwrap_or(1);
            shortened = true;
        }
    }
    let issued = ca.issue(&request).with_context(|| {
        format!(
            "pki issue: cannot issue a {} certificate for {:?}",
            args.service, args.name
        )
    })?;
    let files = issued.write(&args.dir, &basename).with_context(|| {
        format!(
            "pki issue: cannot write the certificate into {}",
            args.dir.display()
        )
    })?;
    let info = pki::inspect(&files.cert)
        .with_context(|| format!("pki issue: cannot read back {}", files.cert.display()))?;

    if request.common_name.is_empty() {
        writeln!(
            out,
            "issued {} certificate without a common name, subject {} ({})",
            args.service, info.subject, request.usage
        )?;
    } else {
        writeln!(
            out,
            "issued {} certificate CN={} ({})",
            args.service, request.common_name, request.usage
        )?;
    }
    writeln!(out, "  certificate: {} (0644)", files.cert.display())?;
    writeln!(out, "  key:         {} (0600)", files.key.display())?;
    if !info.dns_names.is_empty() {
        writeln!(out, "  DNS names:   {}", info.dns_names.join(", "))?;
    }
    if !info.ip_addresses.is_empty() {
        writeln!(out, "  addresses:   {}", join(&info.ip_addresses))?;
    }
    writeln!(
        out,
        "  valid until: {} ({} days)",
        pki::format_time(info.not_after),
        request.validity_days
    )?;
    if shortened {
        writeln!(
            out,
            "  note:        shortened from {DEFAULT_LEAF_DAYS} days because the CA expires on {}; renew the CA",
            pki::format_time(ca.not_after())
        )?;
    }
    writeln!(
        out,
        "  signed by:   {:?} ({})",
        ca.common_name(),
        ca_cert.display()
    )?;
    Ok(())
}

fn show(args: ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let info = pki::inspect(&args.file).with_context(|| {
        format!(
            "pki show: cannot read a certificate from {}",
            args.file.display()
        )
    })?;
    match args.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, &info)?;
            writeln!(out)?;
        }
        Format::Text => write_text(&info, out)?,
    }
    Ok(())
}

fn write_text(info: &CertInfo, out: &mut dyn Write) -> std::io::Result<()> {
    let dash = |v: String| if v.is_empty() { "-".to_owned() } else { v };
    let mut lines: Vec<(&str, String)> = vec![
        ("file", info.path.display().to_string()),
        ("subject CN", dash(info.subject_cn.clone())),
        ("subject", dash(info.subject.clone())),
        ("issuer CN", dash(info.issuer_cn.clone())),
        ("issuer", dash(info.issuer.clone())),
        ("serial", info.serial.clone()),
        ("not before", pki::format_time(info.not_before)),
        ("not after", pki::format_time(info.not_after)),
        ("days left", days_left(info)),
        (
            "CA",
            if info.is_ca {
                "yes".to_owned()
            } else {
                "no".to_owned()
            },
        ),
        ("public key", info.public_key.clone()),
        ("key usage", dash(info.key_usage.join(", "))),
        ("extended key usage", dash(info.ekus.join(", "))),
        ("DNS names", dash(info.dns_names.join(", "))),
        ("IP addresses", dash(join(&info.ip_addresses))),
    ];
    if info.certificates_in_file > 1 {
        lines.push((
            "note",
            format!(
                "the file holds {} certificates; this is the first",
                info.certificates_in_file
            ),
        ));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in lines {
        writeln!(out, "{:<width$} {value}", format!("{key}:"))?;
    }
    Ok(())
}

/// True when both paths name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn days_left(info: &CertInfo) -> String {
    // Seconds as f64 are exact far beyond any certificate's lifetime.
    let days = info.seconds_left as f64 / 86_400.0;
    if info.is_expired() {
        format!("EXPIRED {:.1} days ago", -days)
    } else {
        format!("{days:.1}")
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        Pki(PkiArgs),
    }

    fn run_cli(args: &[&str]) -> anyhow::Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("pgkeep").chain(args.iter().copied()))?;
        let Top::Pki(pki) = cli.cmd;
        let mut out = Vec::new();
        run_with_output(pki, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    #[test]
    fn clap_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn init_issue_show() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let d = dir.to_str().unwrap();
        let out = run_cli(&["pki", "init", "--dir", d, "--cn", "unit CA", "--days", "30"]).unwrap();
        assert!(out.contains("created CA \"unit CA\""), "{out}");

        let err = run_cli(&["pki", "init", "--dir", d])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key already exists"), "{err}");

        let out = run_cli(&[
            "pki",
            "issue",
            "--dir",
            d,
            "--service",
            "etcd-server",
            "--name",
            "e1",
            "--host",
            "e1.example,localhost",
            "--ip",
            "127.0.0.1",
            "--days",
            "10",
        ])
        .unwrap();
        assert!(out.contains("CN=etcd-server-e1 (server+client)"), "{out}");

        let err = run_cli(&[
            "pki",
            "issue",
            "--dir",
            d,
            "--service",
            "etcd-server",
            "--name",
            "e1",
            "--host",
            "e1",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("already exists"), "{err}");

        let crt = dir.join("etcd-server-e1.crt");
        let out = run_cli(&["pki", "show", crt.to_str().unwrap()]).unwrap();
        assert!(out.contains("subject CN:"), "{out}");
        assert!(out.contains("etcd-server-e1"), "{out}");
        assert!(out.contains("serverAuth, clientAuth"), "{out}");
        assert!(out.contains("e1.example, localhost"), "{out}");
        assert!(out.contains("days left:          10.0\n"), "{out}");

        let out = run_cli(&["pki", "show", crt.to_str().unwrap(), "--format", "json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["subject_cn"], "etcd-server-e1");
        assert_eq!(v["issuer_cn"], "unit CA");
        assert_eq!(v["ip_addresses"][0], "127.0.0.1");
    }

    #[test]
    fn issue_without_ca_says_how_to_make_one() {
        let tmp = tempfile::tempdir().unwrap();
        let err = run_cli(&[
            "pki",
            "issue",
            "--dir",
            tmp.path().to_str().unwrap(),
            "--service",
            "operator",
            "--name",
            "alice",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("pgkeep pki init"), "{err}");
    }

    #[test]
    fn unknown_service_is_a_usage_error() {
        let err = run_cli(&[
            "pki",
            "issue",
            "--dir",
            "/x",
            "--service",
            "etcd",
            "--name",
            "a",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("etcd-server"), "{err}");
    }

    #[test]
    fn adopting_a_ca_already_in_place_keeps_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_str().unwrap();
        run_cli(&["pki", "init", "--dir", d]).unwrap();
        let (c, k) = (tmp.path().join("ca.crt"), tmp.path().join("ca.key"));
        let (cs, ks) = (c.to_str().unwrap(), k.to_str().unwrap());
        for force in [false, true] {
            let mut args = vec!["pki", "init", "--dir", d, "--ca-cert", cs, "--ca-key", ks];
            if force {
                args.push("--force");
            }
            let out = run_cli(&args).unwrap();
            assert!(!out.contains("removed"), "{out}");
            assert!(k.exists(), "the CA key was removed");
        }
    }

    #[test]
    fn ca_key_needs_ca_cert() {
        assert!(run_cli(&["pki", "init", "--dir", "/x", "--ca-key", "/k"]).is_err());
    }
}
