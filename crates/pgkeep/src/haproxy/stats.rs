//! HAProxy's stats socket: the state of every server (`show stat`) and the server-state file a
//! reload starts from (`show servers state`).
//!
//! One command per connection (HAProxy answers and closes); every read and write is bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One server of one backend, from `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// Backend (`pxname`).
    pub backend: String,
    /// Server (`svname`).
    pub server: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (going up), `MAINT`, `no check`, ...
    pub status: String,
    /// Result of the last check, e.g. `L7OK`, `L7STS`, `L6RSP`, `L4CON`.
    pub check_status: String,
    /// Description of the last check (`last_chk`), e.g. the HTTP status or TLS error.
    pub last_check: String,
    /// Sessions the server received since HAProxy started (`stot`).
    pub sessions: u64,
}

impl ServerStat {
    /// HAProxy sends new connections to it: `UP`, or `UP x/y` (failing, not yet DOWN).
    pub fn routable(&self) -> bool {
        self.status == "UP" || self.status.starts_with("UP ")
    }
}

/// Parses the CSV of `show stat` (servers only; frontends and backends are skipped).
pub fn parse_show_stat(csv: &str) -> Result<Vec<ServerStat>, String> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or("no `# pxname,...` header")?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or(format!("no column {name}"))
    };
    let (px, sv, st, chk, last, stot, ty) = (
        col("pxname")?,
        col("svname")?,
        col("status")?,
        col("check_status")?,
        col("last_chk")?,
        col("stot")?,
        col("type")?,
    );
    let mut out = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let get = |i: usize| f.get(i).copied().unwrap_or("");
        // type 2 = server (0 frontend, 1 backend, 3 listener).
        if get(ty) != "2" {
            continue;
        }
        out.push(ServerStat {
            backend: get(px).to_owned(),
            server: get(sv).to_owned(),
            status: get(st).to_owned(),
            check_status: get(chk).trim_start_matches('*').trim().to_owned(),
            last_check: get(last).to_owned(),
            sessions: get(stot).parse().unwrap_or(0),
        });
    }
    Ok(out)
}

/// The names of the servers of `backend` that take new connections, sorted.
pub fn routable(stats: &[ServerStat], backend: &str) -> Vec<String> {
    let mut v: Vec<String> = stats
        .iter()
        .filter(|s| s.backend == backend && s.routable())
        .map(|s| s.server.clone())
        .collect();
    v.sort();
    v
}

/// Sends one command to the stats socket and returns the answer.
pub fn command(socket: &Path, cmd: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Every server's state (`show stat`).
pub fn show_stat(socket: &Path) -> std::io::Result<Vec<ServerStat>> {
    let text = command(socket, "show stat", Duration::from_secs(2))?;
    parse_show_stat(&text).map_err(|e| std::io::Error::other(format!("show stat: {e}")))
}

/// Writes `show servers state` to `file` (0644, atomically), for `server-state-file`: the next
/// HAProxy process (a reload) starts from these states instead of every server UP.
pub fn save_state(socket: &Path, file: &Path) -> std::io::Result<()> {
    let text = command(socket, "show servers state", Duration::from_secs(2))?;
    if !text.starts_with('1') {
        return Err(std::io::Error::other(format!(
            "show servers state: unexpected answer {:?}",
            text.lines().next().unwrap_or("")
        )));
    }
    crate::fsutil::write_atomic(file, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,
pg_write,FRONTEND,,,0,1,2000,3,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,1,,,,,,,,,,,0,0,0,,,0,0,0,0,,,,,
pg_write,node1,0,0,0,1,,3,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,12,0,,1,3,1,,3,,2,0,,1,L7OK,200,2,,,,,,,,,,,0,0,,,,,5,HTTP status check returned code <3C>200<3E>,,
pg_write,node2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,11,11,,1,3,2,,0,,2,0,,0,L7STS,503,1,,,,,,,,,,,0,0,,,,,-1,HTTP status check returned code <3C>503<3E>,,
pg_write,node3,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP 1/2,1,1,0,1,0,12,0,,1,3,3,,0,,2,0,,0,* L6RSP,,1,,,,,,,,,,,0,0,,,,,-1,SSL handshake failure,,
pg_write,BACKEND,0,0,0,1,200,3,0,0,0,0,,0,0,0,0,UP,1,1,0,,0,12,0,,1,3,0,,3,,1,0,,1,,,,,,,,,,,,,,0,0,0,0,0,0,5,,,
";

    #[test]
    fn show_stat_parses_servers_only() {
        let s = parse_show_stat(SAMPLE).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].server, "node1");
        assert_eq!(s[0].check_status, "L7OK");
        assert_eq!(s[0].sessions, 3);
        assert_eq!(s[1].status, "DOWN");
        assert_eq!(s[2].check_status, "L6RSP");
        assert_eq!(s[2].last_check, "SSL handshake failure");
        assert_eq!(routable(&s, "pg_write"), ["node1", "node3"]);
        assert!(routable(&s, "pg_read").is_empty());
        assert!(parse_show_stat("garbage").is_err());
    }
}
