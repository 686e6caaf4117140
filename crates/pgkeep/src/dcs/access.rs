//! etcd access control for pgkeep clusters: the users and roles a cluster needs ([`Plan`]), and
//! [`Admin`], which creates them and turns authentication on, as etcd's `root` user.
//!
//! With `--client-cert-auth`, etcd takes a gRPC client certificate's common name as its user
//! name; a password user logs in and sends a token instead, the only way through etcd's JSON
//! gateway. Once authentication is enabled, a request may only touch what its user's roles grant.
//! For a cluster `<scope>` under `<namespace>` ([`Plan::cluster`]), `<prefix>` being
//! `/<namespace>/<scope>/` (a prefix range: `/service/demo2/` is not inside `/service/demo/`):
//!
//! | user | logs in with | role | may |
//! |---|---|---|---|
//! | `root` | a certificate with CN `root` (the user has no password) | `root` | manage users and roles (and everything else) |
//! | `pgkeep-<node>` | the agent's `etcd-client` certificate | `pgkeep-<scope>` | read and write `<prefix>` |
//! | `pgkeep-operator` | the operator's `etcd-client` certificate | `pgkeep-<scope>` | read and write `<prefix>` (switchover, edit-config) |
//! | `patronictl@<scope>` | a password (gateway) | `pgkeep-<scope>.readonly` | read `<prefix>` |
//!
//! User names are kept apart from every other certificate's common name
//! ([`crate::pki::is_etcd_identity`]): certificate users are `pgkeep-*` (only the `etcd-client`
//! profile yields that), password users contain `@` (no certificate pgkeep issues can), so a
//! certificate issued for another purpose is never an etcd identity and a password user cannot
//! be reached with a certificate pgkeep issued.
//!
//! # What a prefix permission covers on etcd 3.4
//!
//! Everything the agent, `pgkeep ctl`, `down`, the health checks and `pki rotate` ask of etcd:
//! ranges, puts, deletes and transactions on the prefix (a transaction's compared keys need read,
//! its operations read or write), a watch of the prefix, `LeaseGrant` and `LeaseKeepAlive` (etcd
//! 3.4 checks no permission on them), `LeaseRevoke` (write on every key attached to the lease:
//! only keys of the prefix), `Status` and `MemberList` (unchecked). None of them needs `root`,
//! and no agent ever holds it.
//!
//! # Converging
//!
//! [`Admin::apply`] reads before it writes, so a run against a converged cluster changes nothing
//! (each change to etcd's auth store makes requests in flight fail once with "revision of auth
//! store is old", which [`crate::dcs`] retries, and drops password users' tokens, which Patroni
//! renews). A role pgkeep manages holds exactly its one permission: a role of that name that
//! grants anything else belongs to someone else (say, a cluster of the same name under another
//! namespace) and is refused, never changed.

use std::collections::BTreeMap;
use std::future::Future;

use etcd_client::{AuthClient, Client, Permission, PermissionType, UserAddOptions};
use pgkeep_core::cluster::base_path;
use secrecy::{ExposeSecret, SecretString};

use super::DcsError;
use super::rpc::{self, Budget};
use super::settings::{EtcdSettings, connect_options};
use crate::pki::ETCD_CLIENT_CN_PREFIX;

/// etcd's administrator: the user and the role.
pub const ROOT: &str = "root";
/// The user [`Admin::auth_enabled`] tries to log in as (it never exists): etcd 3.4 has no
/// `AuthStatus`, and answers a login with "authentication is not enabled" or "authentication
/// failed". etcd logs the failed login under this name.
const PROBE_USER: &str = "pgkeep-auth-status-probe";

/// What a role may do on its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    ReadWrite,
    /// Read only.
    ReadOnly,
}

impl Access {
    /// etcdctl's word for it (`role grant-permission ROLE <word> KEY`).
    pub fn etcdctl_word(self) -> &'static str {
        match self {
            Access::ReadWrite => "readwrite",
            Access::ReadOnly => "read",
        }
    }

    /// In words, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Access::ReadWrite => "read and write",
            Access::ReadOnly => "read",
        }
    }

    fn perm_type(self) -> PermissionType {
        match self {
            Access::ReadWrite => PermissionType::Readwrite,
            Access::ReadOnly => PermissionType::Read,
        }
    }
}

/// How a user logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The common name of a client certificate (gRPC only); the user has no password.
    Certificate,
    /// A password (the token etcd gives for it), the only way through the JSON gateway.
    Password,
}

/// A role with one permission: `access` on every key under `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The role's name.
    pub name: String,
    /// The key prefix (ends with `/`).
    pub prefix: String,
    /// What the role may do there.
    pub access: Access,
}

/// An etcd user and the roles it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's name (a certificate's common name, or a password user's `purpose@scope`).
    pub name: String,
    /// How it logs in.
    pub credential: Credential,
    /// Roles it must have (others it has are left alone).
    pub roles: Vec<String>,
    /// Who it is, for people (`agent of node1`).
    pub about: String,
}

/// The users and roles of one or more clusters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Roles, each with its one permission.
    pub roles: Vec<Role>,
    /// Users and their roles.
    pub users: Vec<User>,
}

/// Why access control could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// etcd failed or refused a request.
    #[error(transparent)]
    Etcd(#[from] DcsError),
    /// A role of the name pgkeep wants already grants something else.
    #[error(
        "etcd role {role} already grants {found}, not only {wanted}: it is not this cluster's \
         (another cluster of the same name under another namespace?); pgkeep does not change it. \
         Remove that permission (etcdctl role revoke-permission {role} ...) or use another cluster name"
    )]
    ForeignRole {
        /// The role.
        role: String,
        /// Its other permissions.
        found: String,
        /// The one pgkeep wants.
        wanted: String,
    },
    /// A user, scope or role name pgkeep will not create.
    #[error("etcd name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// A password user without a password.
    #[error("no password was given for the etcd password user {0}")]
    MissingPassword(String),
}

/// `/<namespace>/<scope>/`: every key of the cluster, Patroni's layout.
pub fn cluster_prefix(namespace: &str, scope: &str) -> String {
    format!("{}/", base_path(namespace, scope))
}

/// The role of a cluster: `pgkeep-<scope>` (read and write) or `pgkeep-<scope>.readonly`. A
/// scope has no `.`, so the two never meet.
pub fn role_name(scope: &str, access: Access) -> String {
    match access {
        Access::ReadWrite => format!("{ETCD_CLIENT_CN_PREFIX}{scope}"),
        Access::ReadOnly => format!("{ETCD_CLIENT_CN_PREFIX}{scope}.readonly"),
    }
}

/// The password user `<purpose>@<scope>`, e.g. `patronictl@demo`.
pub fn password_user(purpose: &str, scope: &str) -> String {
    format!("{purpose}@{scope}")
}

/// The end of the prefix range (etcd's rule: the last byte below 0xff plus one).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    for (i, b) in prefix.iter().enumerate().rev() {
        if *b < 0xff {
            let mut end = prefix[..=i].to_vec();
            end[i] = b + 1;
            return end;
        }
    }
    vec![0]
}

fn bad<T>(name: &str, reason: impl Into<String>) -> Result<T, AccessError> {
    Err(AccessError::BadName {
        name: name.to_owned(),
        reason: reason.into(),
    })
}

/// A scope pgkeep names roles after: letters, digits, `-` and `_` (no `.`, no `/`).
pub fn check_scope(scope: &str) -> Result<(), AccessError> {
    let ok = !scope.is_empty()
        && scope.len() <= 63
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        bad(scope, "a scope is 1 to 63 letters, digits, '-' or '_'")
    }
}

/// A user pgkeep will create: never `root`; a certificate user is exactly what the
/// `etcd-client` profile yields (`pgkeep-<name>`); a password user's name contains `@`.
pub fn check_user(name: &str, credential: Credential) -> Result<(), AccessError> {
    if name == ROOT {
        return bad(
            name,
            "root is etcd's administrator; pgkeep up creates it, with no password",
        );
    }
    let visible = !name.is_empty()
        && name.len() <= 128
        && !name.chars().any(|c| c.is_control() || c.is_whitespace());
    if !visible || name.contains(':') {
        return bad(
            name,
            "use 1 to 128 visible characters and no ':' (etcdctl reads user:password)",
        );
    }
    match credential {
        Credential::Certificate => {
            let rest = name.strip_prefix(ETCD_CLIENT_CN_PREFIX).unwrap_or("");
            let ok = rest.len() <= 40
                && rest
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if ok {
                Ok(())
            } else {
                bad(
                    name,
                    "a certificate user is the common name of an etcd-client certificate, \
                     pgkeep-<name>; any other name would make a certificate issued for another \
                     purpose an etcd identity",
                )
            }
        }
        Credential::Password if name.contains('@') => Ok(()),
        Credential::Password => bad(
            name,
            "a password user's name contains '@' (like patronictl@demo): no certificate pgkeep \
             issues can carry it as its common name, so only the password logs in as it",
        ),
    }
}

impl Plan {
    /// One cluster: `pgkeep-<scope>` (read and write) for `cert_users` (the agents' and the
    /// operators' certificate common names, with who they are), `pgkeep-<scope>.readonly` for
    /// `readonly_users` (password users).
    pub fn cluster(
        namespace: &str,
        scope: &str,
        cert_users: &[(String, String)],
        readonly_users: &[(String, String)],
    ) -> Result<Plan, AccessError> {
        check_scope(scope)?;
        let prefix = cluster_prefix(namespace, scope);
        let mut plan = Plan::default();
        for access in [Access::ReadWrite, Access::ReadOnly] {
            plan.roles.push(Role {
                name: role_name(scope, access),
                prefix: prefix.clone(),
                access,
            });
        }
        for (list, credential, access) in [
            (cert_users, Credential::Certificate, Access::ReadWrite),
            (readonly_users, Credential::Password, Access::ReadOnly),
        ] {
            for (name, about) in list {
                check_user(name, credential)?;
                plan.users.push(User {
                    name: name.clone(),
                    credential,
                    roles: vec![role_name(scope, access)],
                    about: about.clone(),
                });
            }
        }
        Ok(plan)
    }

    /// One user with `access` to the keys of `scope` (role `pgkeep-<scope>` or
    /// `pgkeep-<scope>.readonly`).
    pub fn grant(
        namespace: &str,
        scope: &str,
        user: &str,
        credential: Credential,
        access: Access,
    ) -> Result<Plan, AccessError> {
        check_scope(scope)?;
        check_user(user, credential)?;
        let role = Role {
            name: role_name(scope, access),
            prefix: cluster_prefix(namespace, scope),
            access,
        };
        Ok(Plan {
            users: vec![User {
                name: user.to_owned(),
                credential,
                roles: vec![role.name.clone()],
                about: format!("granted {} on {}", access.describe(), role.prefix),
            }],
            roles: vec![role],
        })
    }
}

/// What [`Admin::apply`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Authentication was on before.
    pub was_enabled: bool,
    /// Authentication is on now.
    pub enabled: bool,
    /// Each change made, in words (no secret); empty when everything was in place.
    pub changes: Vec<String>,
}

/// A login attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    Accepted,
    Refused,
    AuthDisabled,
}

/// True when `e` is etcd refusing with a message that contains `what`.
fn etcd_says(e: &DcsError, what: &str) -> bool {
    matches!(e, DcsError::Refused { source: etcd_client::Error::GRpcStatus(s), .. } if s.message().contains(what))
}

fn permission_text(p: &Permission) -> String {
    let kind = match PermissionType::try_from(p.get_type()) {
        Ok(PermissionType::Read) => "read",
        Ok(PermissionType::Write) => "write",
        _ => "readwrite",
    };
    format!(
        "{kind} [{}, {})",
        String::from_utf8_lossy(p.key()),
        String::from_utf8_lossy(p.range_end())
    )
}

/// An etcd client with the `root` identity, for user and role management.
pub struct Admin {
    client: Client,
    budget: Budget,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// A client for `settings` (whose certificate should be the `etcd-root` one: with
    /// authentication on, only `root` may manage users and roles).
    pub async fn connect(settings: &EtcdSettings) -> Result<Admin, AccessError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (endpoints, options, _) = connect_options(settings)?;
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| DcsError::Config(format!("etcd client: {}", rpc::describe(&e))))?;
        Ok(Admin {
            client,
            budget: Budget::new(settings.request_timeout, endpoints.len()),
        })
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, DcsError>
    where
        F: Fn(AuthClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        rpc::call(op, self.budget, None, |_| f(self.client.auth_client())).await
    }

    /// Logs in as `name` (retrying only transient failures); the token is dropped.
    async fn login(&self, name: &str, password: &str) -> Result<Login, DcsError> {
        self.call("authenticate", |mut a| async move {
            match a.authenticate(name.to_owned(), password.to_owned()).await {
                Ok(_) => Ok(Login::Accepted),
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains("authentication is not enabled") =>
                {
                    Ok(Login::AuthDisabled)
                }
                // "invalid user ID or password", or "password was given for no password user".
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains("authentication failed") =>
                {
                    Ok(Login::Refused)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Whether etcd enforces authentication (etcd 3.4 has no `AuthStatus`: a login attempt as a
    /// user that does not exist tells).
    pub async fn auth_enabled(&self) -> Result<bool, AccessError> {
        Ok(self.login(PROBE_USER, "-").await? != Login::AuthDisabled)
    }

    /// Creates what `plan` needs and is missing, with the passwords of its password users from
    /// `passwords` (a password that no longer logs in is set again); with `enable`, also the
    /// `root` user (no password: its certificate is its only credential), and then turns
    /// authentication on if it is off. Reads first and writes only what differs.
    pub async fn apply(
        &self,
        plan: &Plan,
        passwords: &BTreeMap<String, SecretString>,
        enable: bool,
    ) -> Result<Report, AccessError> {
        let was_enabled = self.auth_enabled().await?;
        let mut changes = Vec::new();
        for u in &plan.users {
            if u.credential == Credential::Password && !passwords.contains_key(&u.name) {
                return Err(AccessError::MissingPassword(u.name.clone()));
            }
        }
        if enable {
            self.ensure_root(&mut changes).await?;
        }
        for role in &plan.roles {
            self.ensure_role(role, &mut changes).await?;
        }
        for user in &plan.users {
            let password = passwords.get(&user.name);
            self.ensure_user(user, password, was_enabled, &mut changes)
                .await?;
        }
        if enable && !was_enabled {
            self.call("auth_enable", |mut a| async move { a.auth_enable().await })
                .await?;
            changes.push("enabled authentication".to_owned());
        }
        Ok(Report {
            was_enabled,
            enabled: was_enabled || enable,
            changes,
        })
    }

    /// The roles of `name`, or `None` when there is no such user.
    async fn user_roles(&self, name: &str) -> Result<Option<Vec<String>>, DcsError> {
        match self
            .call("user_get", |mut a| async move { a.user_get(name).await })
            .await
        {
            Ok(r) => Ok(Some(r.roles().to_vec())),
            Err(e) if etcd_says(&e, "user name not found") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn grant_role(&self, user: &str, role: &str) -> Result<(), DcsError> {
        self.call("user_grant_role", |mut a| async move {
            a.user_grant_role(user, role).await
        })
        .await
        .map(drop)
    }

    async fn ensure_root(&self, changes: &mut Vec<String>) -> Result<(), AccessError> {
        let roles = match self.user_roles(ROOT).await? {
            Some(r) => r,
            None => {
                let no_password = Some(UserAddOptions::new().with_no_pwd());
                self.call("user_add", |mut a| {
                    let opts = no_password.clone();
                    async move { a.user_add(ROOT, "", opts).await }
                })
                .await?;
                changes.push("added user root (certificate CN root, no password)".to_owned());
                Vec::new()
            }
        };
        if !roles.iter().any(|r| r == ROOT) {
            self.grant_role(ROOT, ROOT).await?;
            changes.push("user root: role root".to_owned());
        }
        Ok(())
    }

    async fn ensure_role(&self, role: &Role, changes: &mut Vec<String>) -> Result<(), AccessError> {
        let name = role.name.as_str();
        let found = match self
            .call("role_get", |mut a| async move { a.role_get(name).await })
            .await
        {
            Ok(r) => r.permissions(),
            Err(e) if etcd_says(&e, "role name not found") => {
                self.call("role_add", |mut a| async move { a.role_add(name).await })
                    .await?;
                changes.push(format!("added role {name}"));
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let key = role.prefix.as_bytes();
        let end = prefix_end(key);
        let same_range = |p: &Permission| p.key() == key && p.range_end() == end.as_slice();
        let foreign: Vec<String> = found
            .iter()
            .filter(|p| !same_range(p))
            .map(permission_text)
            .collect();
        if !foreign.is_empty() {
            return Err(AccessError::ForeignRole {
                role: name.to_owned(),
                found: foreign.join(", "),
                wanted: format!("{} {}", role.access.etcdctl_word(), role.prefix),
            });
        }
        let want = role.access.perm_type() as i32;
        if !found.iter().any(|p| same_range(p) && p.get_type() == want) {
            let perm = match role.access {
                Access::ReadWrite => Permission::read_write(key),
                Access::ReadOnly => Permission::read(key),
            }
            .with_prefix();
            self.call("role_grant_permission", |mut a| {
                let perm = perm.clone();
                async move { a.role_grant_permission(name, perm).await }
            })
            .await?;
            changes.push(format!(
                "role {name}: {} on {}",
                role.access.describe(),
                role.prefix
            ));
        }
        Ok(())
    }

    async fn ensure_user(
        &self,
        user: &User,
        password: Option<&SecretString>,
        auth_on: bool,
        changes: &mut Vec<String>,
    ) -> Result<(), AccessError> {
        let name = user.name.as_str();
        let secret = password.map(|p| p.expose_secret()).unwrap_or_default();
        let roles = match self.user_roles(name).await? {
            None => {
                let opts = (user.credential == Credential::Certificate)
                    .then(|| UserAddOptions::new().with_no_pwd());
                self.call("user_add", |mut a| {
                    let opts = opts.clone();
                    async move { a.user_add(name, secret, opts).await }
                })
                .await?;
                changes.push(match user.credential {
                    Credential::Certificate => {
                        format!("added user {name} (certificate, no password)")
                    }
                    Credential::Password => format!("added user {name} (password)"),
                });
                Vec::new()
            }
            Some(roles) => {
                if user.credential == Credential::Password {
                    // With authentication off no token is in use: setting it costs nothing.
                    let current = auth_on && self.login(name, secret).await? == Login::Accepted;
                    if !current {
                        self.call("user_change_password", |mut a| async move {
                            a.user_change_password(name, secret).await
                        })
                        .await?;
                        changes.push(format!("user {name}: password set from its file"));
                    }
                }
                roles
            }
        };
        for role in &user.roles {
            if !roles.contains(role) {
                self.grant_role(name, role).await?;
                changes.push(format!("user {name}: role {role}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(v: &[&str]) -> Vec<(String, String)> {
        v.iter()
            .map(|n| ((*n).to_owned(), "x".to_owned()))
            .collect()
    }

    #[test]
    fn prefixes_and_role_names() {
        assert_eq!(cluster_prefix("/service/", "demo"), "/service/demo/");
        assert_eq!(cluster_prefix("service", "demo"), "/service/demo/");
        assert_eq!(prefix_end(b"/service/demo/"), b"/service/demo0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
        assert_eq!(role_name("demo", Access::ReadWrite), "pgkeep-demo");
        assert_eq!(role_name("demo", Access::ReadOnly), "pgkeep-demo.readonly");
        assert_eq!(password_user("patronictl", "demo"), "patronictl@demo");
    }

    #[test]
    fn a_cluster_plan() {
        let plan = Plan::cluster(
            "/service/",
            "demo",
            &users(&["pgkeep-node1", "pgkeep-operator"]),
            &users(&["patronictl@demo"]),
        )
        .unwrap();
        assert_eq!(plan.roles.len(), 2);
        assert!(plan.roles.iter().all(|r| r.prefix == "/service/demo/"));
        let ro = plan
            .users
            .iter()
            .find(|u| u.name == "patronictl@demo")
            .unwrap();
        assert_eq!(ro.credential, Credential::Password);
        assert_eq!(ro.roles, vec!["pgkeep-demo.readonly"]);
        let agent = &plan.users[0];
        assert_eq!(agent.credential, Credential::Certificate);
        assert_eq!(agent.roles, vec!["pgkeep-demo"]);
        assert!(!plan.users.iter().any(|u| u.name == ROOT));
    }

    #[test]
    fn names_that_would_mix_identities_are_refused() {
        let cert = |n| check_user(n, Credential::Certificate);
        let pass = |n| check_user(n, Credential::Password);
        assert!(cert("pgkeep-node1").is_ok());
        assert!(pass("patronictl@demo").is_ok());
        for n in [
            "root",
            "restapi-client-node1",
            "node1.demo.internal",
            "pgkeep-",
            "pgkeep-a@b",
        ] {
            assert!(cert(n).is_err(), "{n:?} accepted as a certificate user");
        }
        for n in ["root", "patronictl", "pgkeep-node1", "a:b@c", "a b@c", ""] {
            assert!(pass(n).is_err(), "{n:?} accepted as a password user");
        }
        // Every certificate user is a name only the etcd-client profile yields, and no password
        // user is a common name pgkeep can issue.
        assert!(crate::pki::is_etcd_identity("pgkeep-node1"));
        assert!(crate::pki::is_etcd_identity("patronictl@demo"));
        for s in ["demo.x", "a/b", ""] {
            assert!(check_scope(s).is_err(), "{s:?}");
        }
        assert!(
            Plan::grant(
                "/service/",
                "patroni",
                "root",
                Credential::Certificate,
                Access::ReadWrite
            )
            .is_err()
        );
    }

    #[test]
    fn a_grant_plan() {
        let p = Plan::grant(
            "/service/",
            "patroni",
            "patroni@patroni",
            Credential::Password,
            Access::ReadWrite,
        )
        .unwrap();
        assert_eq!(p.roles[0].name, "pgkeep-patroni");
        assert_eq!(p.roles[0].prefix, "/service/patroni/");
        assert_eq!(p.users[0].roles, vec!["pgkeep-patroni"]);
    }

    #[test]
    fn refusals_are_recognised_by_message() {
        let e = DcsError::Refused {
            op: "role_get",
            detail: "x".into(),
            source: etcd_client::Error::GRpcStatus(tonic::Status::failed_precondition(
                "etcdserver: role name not found",
            )),
        };
        assert!(etcd_says(&e, "role name not found"));
        assert!(!etcd_says(&e, "user name not found"));
    }
}
