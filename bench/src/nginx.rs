//! The plain nginx TLS endpoint of the REST scenario, as in `../shared/floors` section C: one
//! worker, `return 200` on `/primary`, TLS 1.2/1.3 with an EC P-256 certificate (here issued
//! by the run's CA, like both products' REST certificates), on 127.0.0.1 only. Its files live
//! under the run's work directory; the master runs in its own cgroup and is stopped by PID.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::pgkeep::Shared;
use crate::sys::{self, Cgroups, Cmd, User};

/// The nginx binary (Debian package `nginx`).
pub const BIN: &str = "/usr/sbin/nginx";

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    /// Its directory (config, certificate, logs, temp paths).
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>/primary`.
    pub url: String,
    /// The master's PID (None once stopped).
    pub pid: Option<u32>,
    /// Its cgroup (master and worker).
    pub cgroup: PathBuf,
    /// `nginx -v`.
    pub version: String,
}

/// The configuration: one worker, loopback only, everything under `dir`.
pub fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"# written by pgkeep-bench (the REST scenario's reference endpoint, ../shared/floors section C)
daemon off;
master_process on;
user www-data;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/nginx.crt;
    ssl_certificate_key {d}/nginx.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /primary {{ default_type application/json; return 200 '{{"role":"primary"}}'; }}
  }}
}}
"#
    )
}

impl Nginx {
    /// Writes the configuration and a certificate from the run's CA into `dir`, starts nginx
    /// on `127.0.0.1:port` in cgroup `nginx` and waits until it answers.
    pub async fn start(dir: &Path, port: u16, shared: &Shared, cg: &Cgroups) -> Result<Nginx> {
        if !Path::new(BIN).exists() {
            bail!("{BIN} is missing (make bench SCENARIOS=rest installs the Debian package nginx)");
        }
        sys::check_port_free(port)?;
        sys::mkdir(dir, 0o755, None)?;
        sys::mkdir(&dir.join("tmp"), 0o755, None)?;
        let root = User::lookup("root")?;
        crate::patroni::issue(dir, "nginx", "nginx-bench", shared, &root).await?;
        let conf = dir.join("nginx.conf");
        sys::write_file(&conf, &config(dir, port), 0o644, None)?;
        let version = Cmd::new(BIN)
            .args(["-v"])
            .timeout(Duration::from_secs(10))
            .output()
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e:#})"));
        let (d, c) = (dir.to_string_lossy(), conf.to_string_lossy());
        let err_log = format!("{d}/error.log");
        Cmd::new(BIN)
            .args(["-t", "-q", "-e", &err_log, "-p", &d, "-c", &c])
            .timeout(Duration::from_secs(20))
            .output()
            .await
            .context("nginx -t")?;
        let cgroup = cg.group("nginx")?;
        let pid = Cmd::new(BIN)
            .args(["-e", &err_log, "-p", &d, "-c", &c])
            .cgroup(&cgroup)
            .spawn(&dir.join("nginx.out"))
            .await?;
        let mut n = Nginx {
            dir: dir.to_owned(),
            url: format!("https://127.0.0.1:{port}/primary"),
            pid: Some(pid),
            cgroup,
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if !sys::alive(pid) || Instant::now() >= deadline {
                n.stop().await;
                bail!(
                    "nginx did not listen on 127.0.0.1:{port}; see {}/error.log",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(n)
    }

    /// The worker's PID (the master's child), if running.
    pub fn worker(&self) -> Option<u32> {
        let master = self.pid?;
        sys::cgroup_procs(&self.cgroup)
            .into_iter()
            .find(|p| *p != master)
    }

    /// Every process (master and worker).
    pub fn pids(&self) -> Vec<u32> {
        sys::cgroup_procs(&self.cgroup)
    }

    /// Graceful stop (SIGQUIT to the master by PID), then SIGTERM/SIGKILL; bounded.
    pub async fn stop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        sys::signal(pid, Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sys::alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !sys::terminate(pid, Duration::from_secs(5)).await {
            eprintln!("warning: nginx {pid} did not stop");
        }
        if !sys::cgroup_wait_empty(&self.cgroup, Duration::from_secs(5)).await {
            let _ = sys::cgroup_kill(&self.cgroup);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_loopback_only_and_local() {
        let c = config(Path::new("/w/nginx"), 17443);
        assert!(c.contains("listen 127.0.0.1:17443 ssl;"));
        assert!(c.contains("worker_processes 1;"));
        assert!(c.contains("pid /w/nginx/nginx.pid;"));
        assert!(c.contains("return 200 '{\"role\":\"primary\"}'"));
        assert_eq!(c.matches("listen ").count(), 1);
        for l in c.lines().filter(|l| l.contains('/') && !l.starts_with('#')) {
            assert!(
                l.contains("/w/nginx/") || l.contains("location = /primary"),
                "{l}"
            );
        }
    }
}
