//! What the agent records for `GET /metrics` beyond the status JSON: promotion and fence
//! counters, the latest decision, certificate expiry.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use pgkeep_core::ha::{self, Decision};

use super::Shell;

/// How often the expiry of the certificates in use is read again (besides start and reload).
const EXPIRY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A certificate that expires within the warning period (or has expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Expiring {
    /// What the agent uses it for (`restapi`, `postgresql`, `etcd_client`, ...).
    pub(super) role: String,
    /// Seconds left until `not_after`; negative once expired.
    pub(super) seconds_left: i64,
}

/// The certificates of `not_after` (role -> Unix time) that expire within `warn_days` days of
/// `now` (Unix time), soonest first.
pub(super) fn expiring(
    not_after: &std::collections::BTreeMap<String, i64>,
    now: i64,
    warn_days: u32,
) -> Vec<Expiring> {
    let horizon = i64::from(warn_days) * 86_400;
    let mut out: Vec<Expiring> = not_after
        .iter()
        .map(|(role, t)| Expiring {
            role: role.clone(),
            seconds_left: t - now,
        })
        .filter(|e| e.seconds_left <= horizon)
        .collect();
    out.sort_by_key(|e| e.seconds_left);
    out
}

impl Shell {
    /// Reads the expiry of every certificate this agent uses (at start, on reload and once a
    /// day; a scrape reads no file) and warns about those that expire within
    /// `pgkeep.certificate_expiry_warning_days`.
    pub(super) fn read_cert_expiry(&mut self) {
        self.certs_checked = std::time::Instant::now();
        let cfg = &self.cfg;
        let pg = &cfg.postgresql;
        let ssl_cert = pg
            .parameters
            .iter()
            .find(|(n, _)| n.as_str() == "ssl_cert_file")
            .map(|(_, v)| PathBuf::from(v.as_str()));
        let certs = [
            ("restapi", cfg.restapi.tls.as_ref().map(|t| t.cert.clone())),
            ("postgresql", ssl_cert),
            (
                "etcd_client",
                cfg.etcd.client.as_ref().map(|t| t.cert.clone()),
            ),
            (
                "restapi_client",
                cfg.ctl.client.as_ref().map(|t| t.cert.clone()),
            ),
            (
                "replication_client",
                pg.authentication
                    .replication
                    .client
                    .as_ref()
                    .map(|t| t.cert.clone()),
            ),
            (
                "rewind_client",
                pg.authentication
                    .rewind
                    .client
                    .as_ref()
                    .map(|t| t.cert.clone()),
            ),
        ];
        self.metrics.cert_not_after.clear();
        let mut paths = std::collections::BTreeMap::new();
        for (role, path) in certs {
            let Some(path) = path else { continue };
            match crate::pki::inspect(&path) {
                Ok(info) => {
                    self.metrics
                        .cert_not_after
                        .insert(role.to_owned(), info.not_after.unix_timestamp());
                    paths.insert(role.to_owned(), path);
                }
                Err(e) => {
                    tracing::warn!(certificate = role, error = %e, "cannot read the certificate's expiry")
                }
            }
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let warn_days = self.cfg.certificate_expiry_warning_days;
        for e in expiring(&self.metrics.cert_not_after, now, warn_days) {
            let path = paths.get(&e.role).map(|p| p.display().to_string());
            let days_left = e.seconds_left.div_euclid(86_400);
            if e.seconds_left < 0 {
                tracing::error!(
                    certificate = %e.role,
                    path = path.as_deref().unwrap_or(""),
                    days_left,
                    "certificate EXPIRED; rotate it (pgkeep pki rotate) and reload the agent"
                );
            } else {
                tracing::warn!(
                    certificate = %e.role,
                    path = path.as_deref().unwrap_or(""),
                    days_left,
                    warn_days,
                    "certificate expires soon; rotate it (pgkeep pki rotate) and reload the agent"
                );
            }
        }
    }

    /// Reads the certificates' expiry again when the last reading is a day old.
    pub(super) fn daily_cert_check(&mut self) {
        if self.certs_checked.elapsed() >= EXPIRY_CHECK_EVERY {
            self.read_cert_expiry();
        }
    }

    /// Notes a decision and what its actions were for the counters.
    pub(super) fn count_decision(&mut self, d: &Decision, promoted: bool) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64());
        self.metrics.last_decision = Some((d.state.to_string(), d.reason.to_string(), at));
        if d.actions.contains(&ha::Action::Fence) {
            self.metrics.fences += 1;
        }
        if promoted {
            // A promotion with a `/failover` request naming this node was asked for (switchover
            // or manual failover); any other follows the loss of the leader.
            let manual = self.watch.snapshot().is_some_and(|s| {
                s.view
                    .failover
                    .as_ref()
                    .is_some_and(|f| f.value.member.as_deref() == Some(self.cfg.name.as_str()))
            });
            if manual {
                self.metrics.promotions_manual += 1;
            } else {
                self.metrics.promotions_automatic += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_within_the_period_soonest_first() {
        let now = 1_000_000_000;
        let day = 86_400;
        let certs: std::collections::BTreeMap<String, i64> = [
            ("restapi", now + 40 * day),
            ("postgresql", now + 30 * day),
            ("etcd_client", now + 29 * day + 10),
            ("rewind_client", now - 5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let got = expiring(&certs, now, 30);
        let roles: Vec<&str> = got.iter().map(|e| e.role.as_str()).collect();
        assert_eq!(roles, ["rewind_client", "etcd_client", "postgresql"]);
        assert_eq!(got[0].seconds_left, -5);
        assert!(
            expiring(&certs, now, 1)
                .iter()
                .all(|e| e.role == "rewind_client")
        );
        assert!(expiring(&Default::default(), now, 30).is_empty());
    }
}
