//! What the agent records for `GET /metrics` beyond the status JSON: promotion and fence
//! counters, the latest decision, certificate expiry.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use pgkeep_core::ha::{self, Decision};

use super::Shell;

impl Shell {
    /// Reads the expiry of every certificate this agent uses (at start and on reload; a scrape
    /// reads no file).
    pub(super) fn read_cert_expiry(&mut self) {
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
        for (role, path) in certs {
            let Some(path) = path else { continue };
            match crate::pki::inspect(&path) {
                Ok(info) => {
                    self.metrics
                        .cert_not_after
                        .insert(role.to_owned(), info.not_after.unix_timestamp());
                }
                Err(e) => {
                    tracing::warn!(certificate = role, error = %e, "cannot read the certificate's expiry")
                }
            }
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
