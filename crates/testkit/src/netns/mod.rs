//! Network-namespace test beds: hosts with their own addresses on a private switch, and faults
//! between them (isolation, partitions) that look like silence on the wire.
//!
//! A [`NetBed`] belongs to an [`Env`] and gives every host:
//!
//! - its own network namespace `pgkt-<checkout-id>.<env-id>.b<n>.<host>` with `lo` up and one
//!   interface `eth0` holding the host's address in `10.231.<k>.0/24` (a `/24` no other bed and
//!   no root-namespace address uses). The root namespace is never changed: both ends of every
//!   veth pair are created directly in the bed's namespaces, and no route leads there;
//! - a port on a Linux bridge `br0` in the bed's switch namespace `...b<n>.sw` (`lo` up too);
//! - the DNS names `<host>.<bed-id>.pgkeep.test` and `<host>` for every host of the bed, through
//!   `/etc/netns/<ns>/hosts`, which `ip netns exec` bind-mounts over `/etc/hosts` (and an empty
//!   `resolv.conf`, so no lookup leaves the bed), and through the same files pinned under a
//!   read-only overlay on `/etc` for the whole life of every process the bed starts (module
//!   `pin`: the file bind mount alone is detached as soon as anything replaces the root
//!   namespace's `/etc/hosts` by rename, as the harness's environments and `pgkeep up` do).
//!
//! Processes start with [`NetBed::command`], [`NetBed::spawn`] and [`NetBed::run`], which mirror
//! [`Env`]'s: the process joins the environment's cgroup (as root, while `/sys/fs/cgroup` is
//! still visible), then `ip netns exec <ns>` enters the namespace, then (still as root) the
//! host's `/etc` files are pinned, then `setpriv` drops to the service user, then the program
//! runs. Each step `exec`s, so the pid std reports is the program's own. Inside, `/sys` is the
//! namespace's sysfs (`ip netns exec` remounts it), so the cgroup tree is not visible to the
//! program, and `/etc` is read-only.
//!
//! Faults are nftables rules in the switch namespace's bridge (table `bridge pgkeep_bed`): every
//! frame but ARP between two cut ports is dropped. The hosts' own namespaces stay untouched, a
//! TCP peer sees no RST and no ICMP error, and established connections go silent as well.
//!
//! Teardown (explicit or on drop) kills the environment's processes that run in the bed's
//! namespaces, deletes the namespaces (which removes the veth pairs and the bridge), the
//! `/etc/netns/<ns>` directories and the pinned copies in the environment's root. The bed holds
//! a handle to its [`Env`], so the environment (and its cgroup) outlives the bed. A killed test
//! process leaves both behind; [`crate::sweep()`] removes them, deciding by the env id in the
//! namespace names whether the owner is dead (the pinned copies go with the environment's root).

mod names;
mod pin;
mod sys;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::service::{self, CommandOutput, Service};
use crate::{Env, ServiceUser, cgroup};

pub(crate) use names::sweep;

/// Interface of a host namespace that is plugged into the switch.
const HOST_IF: &str = "eth0";

/// The bridge in the switch namespace.
const BRIDGE: &str = "br0";

/// Bound on waiting for the links to come up after the bed is built.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on waiting for the bed's processes to die at teardown.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// One host of a bed.
#[derive(Debug)]
struct Host {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    dns_name: String,
    /// Its interface in the switch namespace.
    port: String,
}

/// What teardown has to undo (filled in as the bed is built) and the faults now applied.
#[derive(Debug, Default)]
struct State {
    /// Namespaces created (or being created), in creation order.
    namespaces: Vec<String>,
    /// Namespaces whose `/etc/netns/<ns>` directory was created.
    etc_dirs: Vec<String>,
    /// Whether the pinned copies (`<env root>/bed-etc/<bed-id>`) may exist.
    pinned: bool,
    /// Cut host pairs `(i, j)`, `i < j`, as indexes into the hosts.
    cuts: BTreeSet<(usize, usize)>,
}

/// A network of hosts, each in its own network namespace, on one private switch. See the module
/// docs. Dropping it tears it down (errors are printed); [`NetBed::teardown`] reports them.
pub struct NetBed {
    id: String,
    net: [u8; 3],
    switch_ns: String,
    hosts: Vec<Host>,
    state: Mutex<State>,
    /// Declared last: dropped after `Drop::drop` has torn the bed down.
    env: Env,
}

impl std::fmt::Debug for NetBed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBed")
            .field("id", &self.id)
            .field("subnet", &self.subnet())
            .field("switch_ns", &self.switch_ns)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl NetBed {
    /// Builds a bed with one host per name in `hosts` (1-253 distinct names of 1-20 characters
    /// of `[a-z0-9-]`; `sw` is reserved), tied to `env`: processes started in the bed join the
    /// environment's cgroup, and their logs go to the environment's log directory. On error,
    /// whatever was built is removed again.
    pub fn new(env: &Env, hosts: &[&str]) -> Result<NetBed> {
        if !nix::unistd::geteuid().is_root() {
            bail!("network-namespace beds need root");
        }
        names::check_hosts(hosts)?;

        // A name taken by a leftover of an earlier process with the same pid is skipped.
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut chosen = None;
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let prefix = names::bed_prefix(env.id(), n);
            let taken = std::iter::once(names::SWITCH_ROLE)
                .chain(hosts.iter().copied())
                .map(|role| names::ns_name(&prefix, role))
                .any(|ns| sys::ns_exists(&ns) || sys::etc_dir(&ns).exists());
            if !taken {
                chosen = Some((n, prefix));
                break;
            }
        }
        let (n, prefix) = chosen.context("no free bed name")?;
        let id = format!("{}-b{n}", env.id());

        // Choose the subnet and register it (the hosts files are the registry) under the lock.
        let lock = sys::lock_subnets()?;
        let used = sys::used_octets()?;
        let start = std::process::id().wrapping_add(n.wrapping_mul(7));
        let k = sys::pick_octet(&used, start).context("no free 10.231.<k>.0/24 network left")?;
        let net = [sys::NET_PREFIX[0], sys::NET_PREFIX[1], k];
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Host {
                name: (*h).to_string(),
                ns: names::ns_name(&prefix, h),
                addr: Ipv4Addr::new(net[0], net[1], net[2], u8::try_from(i + 1).expect("<= 253")),
                dns_name: format!("{h}.{id}.{}", crate::DNS_SUFFIX),
                port: names::switch_port(i, h),
            })
            .collect();
        let bed = NetBed {
            id,
            net,
            switch_ns: names::ns_name(&prefix, names::SWITCH_ROLE),
            hosts,
            state: Mutex::new(State::default()),
            env: env.clone(),
        };
        bed.write_etc_files()?;
        drop(lock);

        bed.build()
            .with_context(|| format!("building network bed {}", bed.id))?;
        Ok(bed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `<env root>/bed-etc/<bed-id>`: the pinned `/etc` files of the bed's hosts.
    fn pinned_dir(&self) -> PathBuf {
        pin::bed_dir(self.env.root(), &self.id)
    }

    /// Writes `/etc/netns/<ns>/hosts` (and an empty `resolv.conf`) for every host, and the same
    /// files to the host's pinned directory (module `pin`).
    fn write_etc_files(&self) -> Result<()> {
        let mut hosts = format!(
            "# pgkeep test bed {} (written by pgkeep-testkit, removed with the bed)\n\
             127.0.0.1 localhost\n\
             ::1 localhost ip6-localhost ip6-loopback\n",
            self.id
        );
        for h in &self.hosts {
            let _ = writeln!(hosts, "{} {} {}", h.addr, h.dns_name, h.name);
        }
        // Bind-mounting a file over a missing /etc/resolv.conf would fail (noisily).
        let resolv = Path::new("/etc/resolv.conf")
            .exists()
            .then_some("# pgkeep test bed: no name servers; names come from /etc/hosts\n");
        let pinned = self.pinned_dir();
        for h in &self.hosts {
            self.state().etc_dirs.push(h.ns.clone());
            let dir = sys::create_etc_dir(&h.ns)?;
            sys::write_public(&dir.join("hosts"), &hosts)?;
            if let Some(resolv) = resolv {
                sys::write_public(&dir.join("resolv.conf"), resolv)?;
            }
            self.state().pinned = true;
            pin::write_host(&pinned, &h.name, &hosts, resolv)?;
        }
        Ok(())
    }

    /// Creates the namespaces, the bridge and the veth pairs, and waits for the links.
    fn build(&self) -> Result<()> {
        let sw = self.switch_ns.as_str();
        self.state().namespaces.push(sw.to_string());
        sys::ip(&["netns", "add", sw])?;
        sys::ip(&["-n", sw, "link", "set", "lo", "up"])?;
        sys::ip(&["-n", sw, "link", "add", BRIDGE, "type", "bridge"])?;
        sys::ip(&["-n", sw, "link", "set", BRIDGE, "up"])?;
        for h in &self.hosts {
            let ns = h.ns.as_str();
            self.state().namespaces.push(ns.to_string());
            sys::ip(&["netns", "add", ns])?;
            sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // Both ends are born in their namespaces: nothing ever appears in the root namespace.
            sys::ip(&[
                "-n", ns, "link", "add", HOST_IF, "type", "veth", "peer", "name", &h.port, "netns",
                sw,
            ])?;
            sys::ip(&["-n", sw, "link", "set", &h.port, "master", BRIDGE])?;
            sys::ip(&["-n", sw, "link", "set", &h.port, "up"])?;
            let cidr = format!("{}/24", h.addr);
            sys::ip(&["-n", ns, "addr", "add", &cidr, "dev", HOST_IF])?;
            sys::ip(&["-n", ns, "link", "set", HOST_IF, "up"])?;
        }
        self.wait_links()
    }

    /// Waits (bounded) until every host's interface has a carrier and every switch port
    /// forwards.
    fn wait_links(&self) -> Result<()> {
        let deadline = Instant::now() + LINK_TIMEOUT;
        loop {
            let ports = sys::ip(&[
                "-n",
                &self.switch_ns,
                "-d",
                "-o",
                "link",
                "show",
                "master",
                BRIDGE,
            ])?;
            let mut pending: Vec<&str> = self
                .hosts
                .iter()
                .filter(|h| {
                    !ports.lines().any(|l| {
                        l.contains(&format!(": {}@", h.port))
                            && l.contains("LOWER_UP")
                            && l.contains("bridge_slave state forwarding")
                    })
                })
                .map(|h| h.name.as_str())
                .collect();
            for h in &self.hosts {
                let link = sys::ip(&["-n", &h.ns, "-o", "link", "show", HOST_IF])?;
                if !link.contains("LOWER_UP") && !pending.contains(&h.name.as_str()) {
                    pending.push(&h.name);
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("links of {pending:?} not up after {LINK_TIMEOUT:?}:\n{ports}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn index(&self, host: &str) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .with_context(|| format!("bed {} has no host {host:?}", self.id))
    }

    fn host(&self, host: &str) -> &Host {
        match self.index(host) {
            Ok(i) => &self.hosts[i],
            Err(e) => panic!("{e:#}"),
        }
    }

    /// The bed id, `<env-id>-b<n>` (the middle label of its DNS names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The environment the bed belongs to.
    pub fn env(&self) -> &Env {
        &self.env
    }

    /// The host names, in the order given to [`NetBed::new`].
    pub fn hosts(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    /// The bed's network, e.g. `10.231.17.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b, c] = self.net;
        format!("{a}.{b}.{c}.0/24")
    }

    /// The address of `host` (on its `eth0`). Panics if the bed has no such host.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        self.host(host).addr
    }

    /// `<host>.<bed-id>.pgkeep.test`, resolvable in every host of the bed (not in the root
    /// namespace). Panics if the bed has no such host.
    pub fn dns_name(&self, host: &str) -> String {
        self.host(host).dns_name.clone()
    }

    /// The network namespace of `host` (for `ip -n` / `ip netns exec`). Panics if the bed has no
    /// such host.
    pub fn ns_name(&self, host: &str) -> &str {
        &self.host(host).ns
    }

    /// The switch namespace, holding the bridge and one port per host.
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// Every namespace of the bed: the switch first, then the hosts.
    pub fn namespaces(&self) -> Vec<&str> {
        std::iter::once(self.switch_ns.as_str())
            .chain(self.hosts.iter().map(|h| h.ns.as_str()))
            .collect()
    }

    /// `/etc/netns/<ns>` of `host`, holding its `hosts` file. Panics if the bed has no such host.
    pub fn etc_dir(&self, host: &str) -> PathBuf {
        sys::etc_dir(&self.host(host).ns)
    }

    /// A command that runs `program args` in `host`'s namespace as `user`, inside the
    /// environment's cgroup, like [`Env::command`] (cleared environment with HOME=`home`, USER,
    /// LOGNAME, PATH, LANG and `envs`; `home` is the working directory), with the bed's names
    /// pinned for the process's whole life (`/etc` is a read-only overlay with the bed's `hosts`
    /// and `resolv.conf` on top; see the module docs). Never put secrets in `args` or `envs`.
    /// Panics if the bed has no such host.
    pub fn command(
        &self,
        host: &str,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
    ) -> Command {
        let h = self.host(host);
        let pinned = self.pinned_dir().join(&h.name);
        let uid = user.uid.to_string();
        let gid = user.gid.to_string();
        let mut inner: Vec<&OsStr> = vec![
            "netns".as_ref(),
            "exec".as_ref(),
            h.ns.as_ref(),
            sys::SH_BIN.as_ref(),
            "-c".as_ref(),
            pin::PIN_SCRIPT.as_ref(),
            pin::PIN_ARG0.as_ref(),
            pinned.as_os_str(),
            uid.as_ref(),
            gid.as_ref(),
        ];
        inner.push(program.as_ref());
        inner.extend_from_slice(args);
        let mut all_envs: Vec<(&str, &OsStr)> = vec![
            ("USER", user.name.as_ref()),
            ("LOGNAME", user.name.as_ref()),
        ];
        all_envs.extend_from_slice(envs);
        // The spawn script joins the cgroup as root and execs `ip netns exec`, which needs root;
        // the pin script (mounting needs root too) then switches to `user` inside the namespace.
        service::command(
            self.env.cgroup_path(),
            &ServiceUser::root(),
            home,
            sys::IP_BIN,
            &inner,
            &all_envs,
        )
    }

    /// Starts a long-running service in `host` (see [`NetBed::command`]); its stdout and stderr
    /// go to `<env root>/logs/<name>.log`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &self,
        host: &str,
        name: &str,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
    ) -> Result<Service> {
        self.index(host)?;
        let cmd = self.command(host, user, home, program, args, envs);
        let log = self.env.root().join("logs").join(format!("{name}.log"));
        Service::spawn(name, cmd, &log)
    }

    /// Runs a short command in `host` (see [`NetBed::command`]) to completion, at most
    /// `timeout`, and returns its output whatever the exit status.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        host: &str,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
        timeout: Duration,
    ) -> Result<CommandOutput> {
        self.index(host)?;
        let cmd = self.command(host, user, home, program, args, envs);
        service::run(cmd, &self.env.tmp_dir(), timeout)
    }

    /// Cuts `host` off from every other host of the bed (both directions; packets are dropped
    /// silently at the switch). Cuts add up until [`NetBed::heal`].
    pub fn isolate(&self, host: &str) -> Result<()> {
        let i = self.index(host)?;
        let pairs = (0..self.hosts.len())
            .filter(|j| *j != i)
            .map(|j| (i.min(j), i.max(j)));
        self.add_cuts(pairs.collect())
            .with_context(|| format!("isolating {host} in bed {}", self.id))
    }

    /// Cuts every host of `a` off from every host of `b` (both directions, silently), leaving
    /// traffic within each group and with hosts in neither untouched. The groups must not
    /// overlap. Cuts add up until [`NetBed::heal`].
    pub fn partition(&self, a: &[&str], b: &[&str]) -> Result<()> {
        let ia = a
            .iter()
            .map(|h| self.index(h))
            .collect::<Result<Vec<_>>>()?;
        let ib = b
            .iter()
            .map(|h| self.index(h))
            .collect::<Result<Vec<_>>>()?;
        if let Some(both) = a.iter().find(|h| b.contains(h)) {
            bail!("host {both} is on both sides of the partition");
        }
        let mut pairs = BTreeSet::new();
        for i in &ia {
            for j in &ib {
                pairs.insert((*i.min(j), *i.max(j)));
            }
        }
        self.add_cuts(pairs)
            .with_context(|| format!("partitioning {a:?} from {b:?} in bed {}", self.id))
    }

    /// Undoes every cut: all hosts reach each other again.
    pub fn heal(&self) -> Result<()> {
        let mut st = self.state();
        self.apply_cuts(&BTreeSet::new())
            .with_context(|| format!("healing bed {}", self.id))?;
        st.cuts.clear();
        Ok(())
    }

    fn add_cuts(&self, pairs: BTreeSet<(usize, usize)>) -> Result<()> {
        let mut st = self.state();
        let mut cuts = st.cuts.clone();
        cuts.extend(pairs);
        self.apply_cuts(&cuts)?;
        st.cuts = cuts;
        Ok(())
    }

    /// Replaces the switch's rules with exactly `cuts`.
    fn apply_cuts(&self, cuts: &BTreeSet<(usize, usize)>) -> Result<()> {
        let pairs: Vec<(&str, &str)> = cuts
            .iter()
            .map(|(i, j)| (self.hosts[*i].port.as_str(), self.hosts[*j].port.as_str()))
            .collect();
        sys::nft_apply(&self.switch_ns, &sys::ruleset(&pairs))
    }

    /// Tears the bed down now instead of at drop, reporting errors: kills the environment's
    /// processes that run in the bed's namespaces, deletes the namespaces (with their
    /// interfaces), the `/etc/netns/<ns>` directories and the pinned copies of their files.
    /// Later calls and the drop do nothing. The environment itself is left alone.
    pub fn teardown(&self) -> Result<()> {
        let mut st = self.state();
        let mut errors = Vec::new();
        let cgroup = self.env.cgroup_path().to_path_buf();
        let ours = move || cgroup::procs(&cgroup).unwrap_or_default();
        // Hosts first, the switch last (the reverse of creation).
        let namespaces: Vec<String> = st.namespaces.drain(..).rev().collect();
        for ns in &namespaces {
            if let Err(e) = sys::kill_ours_in(ns, &ours, KILL_TIMEOUT) {
                errors.push(format!("{e:#}"));
            }
        }
        for ns in &namespaces {
            if let Err(e) = sys::delete_ns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        for ns in st.etc_dirs.drain(..) {
            if let Err(e) = sys::remove_etc_dir(&ns) {
                errors.push(format!("{e:#}"));
            }
        }
        sys::remove_etc_netns_if_empty();
        if std::mem::take(&mut st.pinned)
            && let Err(e) = pin::remove_bed(&self.pinned_dir())
        {
            errors.push(format!("{e:#}"));
        }
        st.cuts.clear();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "tearing down network bed {}: {}",
                self.id,
                errors.join("; ")
            )
        }
    }
}

impl Drop for NetBed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pgkeep-testkit: {e:#}");
        }
    }
}
