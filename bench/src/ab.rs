//! ApacheBench (`ab`, Debian apache2-utils), the one load tool for every HTTPS endpoint of the
//! REST scenario: it speaks HTTP/1.0 and reads a response without `Content-Length` until the
//! server closes (Patroni's API, which `wrk` cannot load), opens a new TLS connection per
//! request unless `-k`, and writes every percentile with µs precision (`-e`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sys::Cmd;

/// One `ab` load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Concurrent connections (`-c`).
    pub concurrency: u32,
    /// HTTP keep-alive (`-k`); otherwise a new TLS connection per request.
    pub keepalive: bool,
}

impl Load {
    /// `c4 new conn` / `c4 keep-alive`.
    pub fn text(&self) -> String {
        format!(
            "c{} {}",
            self.concurrency,
            if self.keepalive {
                "keep-alive"
            } else {
                "new conn"
            }
        )
    }
}

/// What one `ab` run reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AbResult {
    /// `Complete requests`.
    pub complete: u64,
    /// `Failed requests` (connect, receive, length or exception failures).
    pub failed: u64,
    /// The breakdown ab prints under a non-zero `Failed requests`.
    pub failed_detail: String,
    /// `Non-2xx responses` (0 when ab prints no such line).
    pub non2xx: u64,
    /// `Keep-Alive requests` (only with `-k`).
    pub keepalive_requests: Option<u64>,
    /// `Requests per second`.
    pub rps: f64,
    /// `Time taken for tests` (s).
    pub secs: f64,
    /// Percentiles of the total time per request (connect + TLS + request + response), ms.
    pub p50: Option<f64>,
    /// 90th percentile (ms).
    pub p90: Option<f64>,
    /// 99th percentile (ms).
    pub p99: Option<f64>,
    /// The slowest request (ms).
    pub max: Option<f64>,
    /// `SSL/TLS Protocol` (`TLSv1.3,TLS_AES_256_GCM_SHA384,256,256`).
    pub tls: String,
    /// `Server Temp Key` (key exchange).
    pub temp_key: String,
    /// `Server Software`.
    pub server: String,
    /// `Document Length`.
    pub doc_length: String,
}

impl AbResult {
    /// The run is usable: requests completed, none answered with a non-2xx status, and no
    /// connect/receive/exception failure (a `Length` failure only means the body length
    /// varied, as Patroni's JSON does).
    pub fn clean(&self) -> bool {
        self.complete > 0 && self.non2xx == 0 && self.hard_failures() == 0
    }

    /// Connect + receive + exception failures (not length mismatches).
    pub fn hard_failures(&self) -> u64 {
        if self.failed == 0 {
            return 0;
        }
        let get = |k: &str| -> Option<u64> {
            let at = self.failed_detail.find(&format!("{k}: "))?;
            self.failed_detail[at + k.len() + 2..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        match (get("Connect"), get("Receive"), get("Exceptions")) {
            (Some(c), Some(r), Some(e)) => c + r + e,
            _ => self.failed,
        }
    }
}

fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix(':'))
        .map(str::trim)
}

fn number<T: std::str::FromStr>(out: &str, key: &str) -> Option<T> {
    value(out, key)?.split_whitespace().next()?.parse().ok()
}

/// Parses ab's standard output and its `-e` CSV (`Percentage served,Time in ms`).
pub fn parse(out: &str, csv: &str) -> Result<AbResult> {
    let complete = number(out, "Complete requests")
        .with_context(|| format!("ab printed no 'Complete requests':\n{out}"))?;
    let failed = number(out, "Failed requests").unwrap_or(0);
    let failed_detail = if failed > 0 {
        out.lines()
            .skip_while(|l| !l.starts_with("Failed requests"))
            .nth(1)
            .map(|l| l.trim().to_owned())
            .filter(|l| l.starts_with('('))
            .unwrap_or_default()
    } else {
        String::new()
    };
    let mut pct = [None; 101];
    for l in csv.lines().skip(1) {
        if let Some((p, t)) = l.split_once(',')
            && let (Ok(p), Ok(t)) = (p.trim().parse::<usize>(), t.trim().parse::<f64>())
            && p <= 100
        {
            pct[p] = Some(t);
        }
    }
    let text = |k: &str| value(out, k).unwrap_or("").to_owned();
    Ok(AbResult {
        complete,
        failed,
        failed_detail,
        non2xx: number(out, "Non-2xx responses").unwrap_or(0),
        keepalive_requests: number(out, "Keep-Alive requests"),
        rps: number(out, "Requests per second").unwrap_or(0.0),
        secs: number(out, "Time taken for tests").unwrap_or(0.0),
        p50: pct[50],
        p90: pct[90],
        p99: pct[99],
        max: pct[100],
        tls: text("SSL/TLS Protocol"),
        temp_key: text("Server Temp Key"),
        server: text("Server Software"),
        doc_length: text("Document Length"),
    })
}

/// Runs `ab -t secs -n 5000000 -c C [-k] -r -e csv url`; the raw output goes to `raw_prefix`
/// `.txt` / `.csv`. `-n` lifts the 50 000-request cap that `-t` implies; `-r` counts receive
/// errors instead of aborting.
pub async fn run(url: &str, load: Load, secs: u64, raw_prefix: &Path) -> Result<AbResult> {
    let csv = raw_prefix.with_extension("csv");
    let secs_s = secs.to_string();
    let c = load.concurrency.to_string();
    let csv_s = csv.to_string_lossy().into_owned();
    let mut args = vec!["-t", &secs_s, "-n", "5000000", "-c", &c, "-r", "-e", &csv_s];
    if load.keepalive {
        args.push("-k");
    }
    args.push(url);
    let out = Cmd::new("/usr/bin/ab")
        .args(&args)
        .timeout(Duration::from_secs(secs + 90))
        .output()
        .await;
    let text = match &out {
        Ok(t) => t.clone(),
        Err(e) => format!("{e:#}"),
    };
    let _ = std::fs::write(
        raw_prefix.with_extension("txt"),
        format!("ab {}\n{text}", args.join(" ")),
    );
    let out = out?;
    let csv_text = std::fs::read_to_string(&csv).unwrap_or_default();
    parse(&out, &csv_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "This is ApacheBench, Version 2.3 <$Revision: 1903618 $>\n\
Server Software:        nginx/1.22.1\n\
Server Hostname:        127.0.0.1\n\
Server Port:            17443\n\
SSL/TLS Server Name:    127.0.0.1\n\
SSL/TLS Protocol:       TLSv1.3,TLS_AES_256_GCM_SHA384,256,256\n\
Server Temp Key:        X25519 253 bits\n\
\n\
Document Path:          /primary\n\
Document Length:        18 bytes\n\
\n\
Concurrency Level:      4\n\
Time taken for tests:   10.000 seconds\n\
Complete requests:      16720\n\
Failed requests:        12\n\
   (Connect: 0, Receive: 0, Length: 12, Exceptions: 0)\n\
Non-2xx responses:      3\n\
Keep-Alive requests:    16700\n\
Requests per second:    1672.00 [#/sec] (mean)\n\
Time per request:       2.392 [ms] (mean)\n";

    #[test]
    fn parses_ab_output() {
        let csv =
            "Percentage served,Time in ms\n0,0.900\n50,2.260\n90,2.450\n99,4.360\n100,13.100\n";
        let r = parse(OUT, csv).unwrap();
        assert_eq!(r.complete, 16720);
        assert_eq!(r.failed, 12);
        assert_eq!(r.hard_failures(), 0);
        assert_eq!(r.non2xx, 3);
        assert!(!r.clean());
        assert_eq!(r.keepalive_requests, Some(16700));
        assert!((r.rps - 1672.0).abs() < 1e-9);
        assert!((r.secs - 10.0).abs() < 1e-9);
        assert_eq!((r.p50, r.p99, r.max), (Some(2.26), Some(4.36), Some(13.1)));
        assert_eq!(r.tls, "TLSv1.3,TLS_AES_256_GCM_SHA384,256,256");
        assert_eq!(r.temp_key, "X25519 253 bits");
        assert_eq!(r.server, "nginx/1.22.1");
        assert_eq!(r.doc_length, "18 bytes");
    }

    #[test]
    fn clean_and_failures() {
        let out = "Complete requests:      100\nFailed requests:        5\n   (Connect: 1, Receive: 2, Length: 0, Exceptions: 2)\nRequests per second:    10.0 [#/sec] (mean)\n";
        let r = parse(out, "").unwrap();
        assert_eq!(r.hard_failures(), 5);
        assert!(!r.clean());
        assert_eq!(r.non2xx, 0);
        assert_eq!(r.keepalive_requests, None);
        assert_eq!(r.p50, None);
        let ok = parse("Complete requests: 7\nFailed requests: 0\n", "").unwrap();
        assert!(ok.clean());
        assert!(parse("apr_socket_connect(): Connection refused", "").is_err());
        assert_eq!(
            Load {
                concurrency: 4,
                keepalive: true
            }
            .text(),
            "c4 keep-alive"
        );
    }
}
