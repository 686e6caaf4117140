//! The policy for extra pg_hba lines (`postgresql.pg_hba`): read the way PostgreSQL reads them,
//! then only strong methods over encrypted transport, and an `ldap` line only when the password
//! it forwards to the LDAP server travels over TLS.

/// The options whose values are secrets: a file that holds one must be 0600, and `config check`
/// shows `<redacted>` instead.
const SECRET_OPTIONS: &[&str] = &["ldapbindpasswd", "radiussecrets"];

fn blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Splits a pg_hba line the way PostgreSQL's tokenizer (`next_field_expand`, `next_token`)
/// does: fields are separated by whitespace, a field is a comma-separated list of tokens,
/// double quotes group (and are removed; `""` inside quotes is a literal quote), and `#`
/// outside quotes starts a comment. Stricter in one point: an unterminated quote is an error.
fn fields(line: &str) -> Result<Vec<Vec<String>>, String> {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        let mut field = Vec::new();
        loop {
            while i < chars.len() && (blank(chars[i]) || chars[i] == ',') {
                i += 1;
            }
            let mut buf = String::new();
            let (mut in_quote, mut was_quote, mut saw_quote, mut comma) =
                (false, false, false, false);
            while i < chars.len() && (!blank(chars[i]) || in_quote) {
                let c = chars[i];
                if c == '#' && !in_quote {
                    i = chars.len();
                    break;
                }
                i += 1;
                if c == ',' && !in_quote {
                    comma = true;
                    break;
                }
                if c != '"' || was_quote {
                    buf.push(c);
                }
                was_quote = in_quote && c == '"' && !was_quote;
                if c == '"' {
                    in_quote = !in_quote;
                    saw_quote = true;
                }
            }
            if in_quote {
                return Err("has an unterminated quote".into());
            }
            if !saw_quote && buf.is_empty() {
                break;
            }
            field.push(buf);
            if !comma {
                break;
            }
        }
        if field.is_empty() {
            return Ok(out);
        }
        out.push(field);
    }
}

fn single<'a>(field: Option<&'a Vec<String>>, what: &str) -> Result<&'a str, String> {
    match field.map(Vec::as_slice) {
        None | Some([]) => Err(format!("has no {what}")),
        Some([one]) => Ok(one),
        Some(_) => Err(format!("lists several values as the {what}")),
    }
}

/// The parts of a line the policy looks at.
struct Line {
    kind: String,
    method: String,
    /// `name=value` options after the method, in order (PostgreSQL: the last one wins).
    options: Vec<(String, String)>,
}

fn parse(line: &str) -> Result<Option<Line>, String> {
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err("contains a control character".into());
    }
    let fields = fields(line)?;
    let Some(first) = fields.first() else {
        return Ok(None);
    };
    let kind = lowercase(single(Some(first), "connection type")?, "connection type")?;
    if kind.starts_with("include") {
        return Err("include directives are not allowed".into());
    }
    let method_at = match kind.as_str() {
        "local" => 3,
        "host" | "hostssl" | "hostnossl" | "hostgssenc" | "hostnogssenc" => {
            let address = single(fields.get(3), "address field")?;
            // An IP address without a prefix length takes a netmask in the next field (a host
            // name, a keyword or `address/prefix` does not), as PostgreSQL reads it.
            if !address.contains('/') && address.parse::<std::net::IpAddr>().is_ok() {
                let mask = single(fields.get(4), "netmask after the address")?;
                if mask.parse::<std::net::IpAddr>().is_err() {
                    return Err(format!(
                        "{mask:?} is not a netmask (write the address as address/prefix)"
                    ));
                }
                5
            } else {
                4
            }
        }
        _ => return Err(format!("{kind:?} is not a pg_hba connection type")),
    };
    let method = lowercase(
        single(fields.get(method_at), "authentication method")?,
        "authentication method",
    )?;
    let mut options = Vec::new();
    for token in fields.iter().skip(method_at + 1).flatten() {
        let (name, value) = token.split_once('=').ok_or_else(|| {
            if has_secret(line) {
                // The token may be part of an unquoted secret: never echo it.
                "an option after the method is not in name=value form (quote a value that \
                 contains blanks)"
                    .to_owned()
            } else {
                format!("the option {token:?} is not in name=value form")
            }
        })?;
        options.push((name.to_owned(), value.to_owned()));
    }
    // PostgreSQL refuses these lines, and with them the whole file: say so here instead.
    if kind != "hostssl" && method == "cert" {
        return Err(format!(
            "cert authentication works only on hostssl lines (PostgreSQL refuses it on {kind})"
        ));
    }
    if kind != "hostssl" && options.iter().any(|(n, _)| n == "clientcert") {
        return Err(format!(
            "clientcert works only on hostssl lines (PostgreSQL refuses it on {kind})"
        ));
    }
    Ok(Some(Line {
        kind,
        method,
        options,
    }))
}

/// PostgreSQL compares connection types and methods exactly: `HOSTSSL` or `Scram-SHA-256`
/// would make it refuse the whole file.
fn lowercase(token: &str, what: &str) -> Result<String, String> {
    if token.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "the {what} {token:?} must be written in lower case (PostgreSQL does not recognise \
             {token:?})"
        ));
    }
    Ok(token.to_owned())
}

/// The scheme an `ldapurl` sets, as libldap's URL parser reads it (case-insensitive, with its
/// optional `<...>` and `URL:` wrappers).
fn url_scheme(url: &str) -> String {
    let u = url.trim_start_matches('<');
    let u = match u.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("url:") => &u[4..],
        _ => u,
    };
    u.split_once("://")
        .map_or_else(String::new, |(s, _)| s.to_ascii_lowercase())
}

/// True when PostgreSQL talks to the LDAP server over TLS: `ldapscheme=ldaps`, an `ldaps://`
/// `ldapurl` (which sets the scheme), or StartTLS (`ldaptls=1`). Later options override earlier
/// ones, as in PostgreSQL.
fn ldap_over_tls(options: &[(String, String)]) -> bool {
    let mut scheme = "ldap".to_owned();
    let mut starttls = false;
    for (name, value) in options {
        match name.as_str() {
            "ldapscheme" => scheme.clone_from(value),
            "ldapurl" => scheme = url_scheme(value),
            "ldaptls" => starttls = value == "1",
            _ => {}
        }
    }
    scheme == "ldaps" || starttls
}

/// Checks one extra pg_hba line. Only strong methods are allowed (an allowlist, so new or
/// oddly written methods cannot slip through), only encrypted connection types for TCP
/// (`hostssl`, and `hostgssenc` for GSSAPI encryption), and `ldap` only with TLS to the LDAP
/// server. `weak_allowed` (`pgkeep.insecure.weak_pg_hba`) lifts the method and transport rules.
pub(super) fn check_line(line: &str, weak_allowed: bool) -> Result<(), String> {
    let Some(Line {
        kind,
        method,
        options,
    }) = parse(line)?
    else {
        return Ok(());
    };
    if weak_allowed {
        return Ok(());
    }
    let strong = match kind.as_str() {
        "local" => matches!(method.as_str(), "peer" | "scram-sha-256" | "reject"),
        _ => matches!(
            method.as_str(),
            "scram-sha-256" | "cert" | "reject" | "gss" | "ldap" | "radius" | "pam"
        ),
    };
    // Refusals quote the line; a bind password or RADIUS secret in it must not reach a log.
    let shown = redacted(line.trim());
    if !strong {
        return Err(format!(
            "{shown:?} allows the weak method {method}; use hostssl with scram-sha-256 or cert \
             (or set pgkeep.insecure.weak_pg_hba)"
        ));
    }
    let plaintext = matches!(kind.as_str(), "host" | "hostnossl" | "hostnogssenc");
    if plaintext && method != "reject" {
        return Err(format!(
            "{shown:?} allows connections without TLS; use hostssl (or hostgssenc for GSSAPI \
             encryption) with scram-sha-256, cert, gss or ldap (or set pgkeep.insecure.weak_pg_hba)"
        ));
    }
    if method == "ldap" && !ldap_over_tls(&options) {
        return Err(format!(
            "{shown:?} sends each user's password to the LDAP server without TLS; add \
             ldapscheme=ldaps (LDAP over TLS, port 636), ldaptls=1 (StartTLS) or use an \
             ldaps:// ldapurl, and trust the server's CA with postgresql.ldap_ca_file \
             (or set pgkeep.insecure.weak_pg_hba)"
        ));
    }
    Ok(())
}

/// True when the line may carry a secret option (`ldapbindpasswd`, `radiussecrets`): any
/// mention counts, also in a line that does not parse, so nothing secret is ever shown or left
/// in a file others can read.
pub(super) fn has_secret(line: &str) -> bool {
    SECRET_OPTIONS.iter().any(|s| line.contains(s))
}

/// The line for display, the value of every secret option replaced by `<redacted>`. A line
/// without one is shown as written.
pub(super) fn redacted(line: &str) -> String {
    if !has_secret(line) {
        return line.to_owned();
    }
    // A line that does not parse may hold a secret split over several tokens.
    let (Ok(Some(_)), Ok(fields)) = (parse(line), fields(line)) else {
        return "<redacted: a line with a secret option>".into();
    };
    let quote = |t: &str| {
        if t.is_empty() || t.contains(|c: char| blank(c) || matches!(c, ',' | '"' | '#')) {
            format!("\"{}\"", t.replace('"', "\"\""))
        } else {
            t.to_owned()
        }
    };
    fields
        .iter()
        .map(|f| {
            f.iter()
                .map(|t| match t.split_once('=') {
                    Some((n, _)) if SECRET_OPTIONS.contains(&n) => format!("{n}=<redacted>"),
                    Some((n, v)) => format!("{n}={}", quote(v)),
                    None => quote(t),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) {
        if let Err(e) = check_line(line, false) {
            panic!("{line:?} was refused: {e}");
        }
    }

    fn refused(line: &str, why: &str) {
        match check_line(line, false) {
            Ok(()) => panic!("{line:?} was accepted"),
            Err(e) => assert!(e.contains(why), "{line:?}: {e}"),
        }
    }

    #[test]
    fn tokens_follow_postgresql() {
        assert_eq!(
            fields(r#"hostssl "my db",x all 10.0.0.0/8 ldap ldapprefix="uid=" ldapsuffix=",ou=a,dc=b" # c"#)
                .unwrap(),
            vec![
                vec!["hostssl"],
                vec!["my db", "x"],
                vec!["all"],
                vec!["10.0.0.0/8"],
                vec!["ldap"],
                vec!["ldapprefix=uid="],
                vec!["ldapsuffix=,ou=a,dc=b"],
            ]
        );
        // `""` inside quotes is one quote; a comma outside quotes splits a field; an empty
        // quoted token is still a token.
        assert_eq!(fields(r#""a""b""#).unwrap(), vec![vec![r#"a"b"#]]);
        assert_eq!(fields("a, b c").unwrap(), vec![vec!["a", "b"], vec!["c"]]);
        assert_eq!(fields(r#"x """#).unwrap(), vec![vec!["x"], vec![""]]);
        assert!(fields("# only a comment").unwrap().is_empty());
        assert!(fields(r#"a "b"#).is_err());
    }

    #[test]
    fn strong_methods_over_tls_are_accepted() {
        ok("hostssl all all 127.0.0.0/8 scram-sha-256");
        ok("hostssl app app 10.0.0.0 255.0.0.0 cert");
        ok("hostssl all all db.example.com scram-sha-256 clientcert=verify-full");
        ok("hostssl all all all cert map=users");
        ok("local all all peer");
        ok("host all all 0.0.0.0/0 reject");
        ok("# a comment");
        ok("");
    }

    #[test]
    fn lines_postgresql_would_refuse_are_refused_even_with_weak_pg_hba() {
        for (line, why) in [
            ("hostssl all all 127.0.0.0/8 MD5", "lower case"),
            ("HOSTSSL all all 127.0.0.0/8 scram-sha-256", "lower case"),
            ("hostssl all all 127.0.0.0/8 Scram-SHA-256", "lower case"),
            ("hostgssenc all all 10.0.0.0/8 cert", "only on hostssl"),
            ("local all all cert", "only on hostssl"),
            ("host all all 10.0.0.0/8 cert", "only on hostssl"),
            (
                "hostgssenc all all 10.0.0.0/8 gss clientcert=verify-ca",
                "clientcert works only on hostssl",
            ),
        ] {
            for weak in [false, true] {
                match check_line(line, weak) {
                    Ok(()) => panic!("{line:?} was accepted (weak {weak})"),
                    Err(e) => assert!(e.contains(why), "{line:?}: {e}"),
                }
            }
        }
        // Database and user names keep their case.
        ok("hostssl App Alice 10.0.0.0/8 scram-sha-256");
    }

    #[test]
    fn gss_is_accepted_over_tls_and_gssapi_encryption() {
        ok("hostssl all all 10.0.0.0/8 gss include_realm=0 krb_realm=EXAMPLE.COM");
        ok("hostgssenc all all 10.0.0.0/8 gss");
        refused("host all all 10.0.0.0/8 gss", "without TLS");
        refused("hostnogssenc all all 10.0.0.0/8 gss", "without TLS");
    }

    #[test]
    fn weak_methods_and_plaintext_are_refused() {
        refused("host all all 0.0.0.0/0 trust", "weak method trust");
        refused(
            "hostssl all all 10.0.0.0 255.255.255.0 trust",
            "weak method trust",
        );
        refused(
            r#"hostssl all all 10.1.0.0/24 "trust""#,
            "weak method trust",
        );
        refused("hostssl all all 127.0.0.0/8 ident", "weak method ident");
        refused("hostssl all all 127.0.0.0/8 md5", "weak method md5");
        refused("local all all ldap ldapscheme=ldaps", "weak method ldap");
        refused("host all all 0.0.0.0/0 scram-sha-256", "without TLS");
        refused("hostnossl all all 0.0.0.0/0 scram-sha-256", "without TLS");
        refused("include_dir /tmp/x", "include");
        refused("hostssl all all 10.0.0.1 scram-sha-256", "not a netmask");
        refused(
            "hostssl all all 10.0.0.0/8 scram-sha-256 novalue",
            "name=value",
        );
        refused("hostssl all all 10.0.0.0/8 \"scram", "quote");
        refused(
            "hostssl all all 10.0.0.0/8 trust,scram-sha-256",
            "several values",
        );
        assert!(
            check_line("# ok\nhostssl all all 0.0.0.0/0 trust", true)
                .unwrap_err()
                .contains("control character")
        );
    }

    #[test]
    fn weak_pg_hba_lifts_the_method_and_transport_rules_but_not_the_syntax() {
        for line in [
            "host all all 0.0.0.0/0 trust",
            "hostnossl all all 0.0.0.0/0 md5",
            "hostssl all all 10.0.0.0/8 ldap ldapserver=l",
        ] {
            assert!(check_line(line, true).is_ok(), "{line}");
        }
        for line in [
            "include_dir /tmp/x",
            "hostssl all all 10.0.0.0/8 trust novalue",
            "hostssl all all 10.0.0.1 trust",
        ] {
            assert!(check_line(line, true).is_err(), "{line}");
        }
    }

    #[test]
    fn ldap_needs_tls_to_the_ldap_server() {
        let base = r#"hostssl all alice 127.0.0.0/8 ldap ldapserver=ldap.example ldapprefix="uid=" ldapsuffix=",ou=people,dc=example""#;
        ok(&format!("{base} ldapscheme=ldaps"));
        ok(&format!("{base} ldaptls=1"));
        ok(&format!("{base} ldapport=636 ldapscheme=\"ldaps\""));
        ok("hostssl all all 10.0.0.0/8 ldap ldapurl=\"ldaps://ldap.example/dc=example?uid?sub\"");
        ok("hostssl all all 10.0.0.0/8 ldap ldapurl=LDAPS://ldap.example/dc=example");
        ok("hostssl all all 10.0.0.0/8 ldap ldapurl=ldap://ldap.example/dc=example ldaptls=1");
        ok("hostgssenc all all 10.0.0.0/8 ldap ldapserver=l ldapscheme=ldaps");
        // Search+bind with the bind password in the line: allowed (the file must be 0600).
        ok(
            "hostssl all all 10.0.0.0/8 ldap ldapserver=l ldapscheme=ldaps ldapbasedn=\"dc=x\" ldapbinddn=\"cn=pg,dc=x\" ldapbindpasswd=\"s e,cret\"",
        );
        let why = "without TLS; add ldapscheme=ldaps";
        refused(base, why);
        refused(&format!("{base} ldapscheme=ldap"), why);
        refused(&format!("{base} ldaptls=0"), why);
        refused(&format!("{base} ldaptls=true"), why);
        // PostgreSQL's option names and scheme values are case-sensitive.
        refused(&format!("{base} LDAPSCHEME=ldaps"), why);
        refused(&format!("{base} ldapscheme=LDAPS"), why);
        // The last option wins, as in PostgreSQL; an ldapurl sets the scheme.
        refused(&format!("{base} ldapscheme=ldaps ldapscheme=ldap"), why);
        refused(&format!("{base} ldapscheme=ldaps,ldapscheme=ldap"), why);
        refused(
            &format!("{base} ldapscheme=ldaps ldapurl=ldap://l/dc=x"),
            why,
        );
        refused(&format!("{base} ldaptls=1 ldaptls=0"), why);
        refused("hostssl all all 10.0.0.0/8 ldap ldapurl=ldap://l/dc=x", why);
        // A quoted value that only looks like the option inside another value.
        refused(&format!(r#"{base} ldapbinddn="x ldapscheme=ldaps""#), why);
        let err = check_line(base, false).unwrap_err();
        assert!(
            err.contains("ldapserver=ldap.example") && err.contains("ldaptls=1"),
            "{err}"
        );
    }

    #[test]
    fn secret_options_are_found_and_redacted() {
        let line = r#"hostssl all all 10.0.0.0/8 ldap ldapserver=l ldapscheme=ldaps ldapbinddn="cn=pg,dc=x" ldapbindpasswd="s3cr3t x,y""#;
        assert!(has_secret(line));
        let shown = redacted(line);
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("x,y"),
            "{shown}"
        );
        assert!(shown.contains("ldapbindpasswd=<redacted>"), "{shown}");
        assert!(shown.contains("ldapbinddn=\"cn=pg,dc=x\""), "{shown}");
        assert!(check_line(&shown.replace("<redacted>", "x"), false).is_ok());
        let radius = "hostssl all all 10.0.0.0/8 radius radiusservers=r radiussecrets=abc";
        assert!(has_secret(radius) && !redacted(radius).contains("abc"));
        let plain = "hostssl all all 10.0.0.0/8 scram-sha-256";
        assert!(!has_secret(plain));
        assert_eq!(redacted(plain), plain);
    }

    /// Refusals quote the line, and they reach stderr and the journal.
    #[test]
    fn a_refused_line_never_shows_its_secret() {
        for (line, secret) in [
            (
                "hostssl all all 10.0.0.0/8 ldap ldapserver=l ldapbinddn=cn=pg ldapbindpasswd=s3cr3t",
                "s3cr3t",
            ),
            (
                "host all all 10.0.0.0/8 radius radiusservers=r radiussecrets=abc123",
                "abc123",
            ),
            (
                "hostssl all all 10.0.0.0/8 ldap ldapscheme=ldaps ldapbindpasswd=a tail-of-it",
                "tail-of-it",
            ),
        ] {
            let e = check_line(line, false).unwrap_err();
            assert!(!e.contains(secret), "{e}");
        }
    }
}
