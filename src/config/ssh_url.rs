//! SSH remotes as written in the configuration: `ssh://[user@]host[:port]/path` (also
//! `git+ssh://` and `ssh+git://`, as Git and libgit2 accept) and the scp-like
//! `[user@]host:path`, checked with Git's rules: no password, no user name or host that
//! could pass for a command-line option (`-…`), no spaces or control characters.

/// Who and where an SSH URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

/// Whether `scheme` is one of the SSH URL schemes.
pub(super) fn is_ssh_scheme(scheme: &str) -> bool {
    matches!(scheme, "ssh" | "git+ssh" | "ssh+git")
}

/// Parses an `ssh://` URL (the caller saw its scheme).
pub(super) fn parse_ssh_url(url: &url::Url) -> Result<SshTarget, String> {
    if url.password().is_some() {
        return Err(
            "must not contain a password; SSH authenticates with a key (auth.ssh_key_file)"
                .to_owned(),
        );
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("the SSH URL has no host")?;
    let user = match url.username() {
        "" => None,
        encoded => Some(
            percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_err(|_| "the user name is not valid UTF-8".to_owned())?
                .into_owned(),
        ),
    };
    if url.path().trim_matches('/').is_empty() {
        return Err("the SSH URL names no repository path".to_owned());
    }
    check(user.as_deref(), host)?;
    Ok(SshTarget {
        user,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: url.port().unwrap_or(22),
    })
}

/// Parses a scp-like `[user@]host:path` (the caller saw a colon before any slash).
pub(super) fn parse_scp_like(text: &str) -> Result<SshTarget, String> {
    let (authority, path) = text.split_once(':').ok_or("expected user@host:path")?;
    // `user:password@host:path` splits at the password's colon.
    if !authority.contains('@') && path.split('/').next().is_some_and(|p| p.contains('@')) {
        return Err(
            "must not contain a password; SSH authenticates with a key (auth.ssh_key_file)"
                .to_owned(),
        );
    }
    let (user, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (Some(user.to_owned()), host),
        None => (None, authority),
    };
    if path.is_empty() {
        return Err("the SSH URL names no repository path after the colon".to_owned());
    }
    check(user.as_deref(), host)?;
    Ok(SshTarget {
        user,
        host: host.to_owned(),
        port: 22,
    })
}

/// Git's rules for the user and the host of an SSH remote.
fn check(user: Option<&str>, host: &str) -> Result<(), String> {
    let bad = |c: char| c.is_control() || c.is_whitespace();
    if let Some(user) = user {
        if user.is_empty() {
            return Err("the user name before `@` is empty".to_owned());
        }
        if user.starts_with('-') {
            return Err(format!(
                "the user name \"{user}\" starts with `-` (Git refuses it: it could pass for an ssh option)"
            ));
        }
        if user.contains(bad) || user.contains(['@', ':', '/']) {
            return Err(format!(
                "the user name \"{}\" contains a space, a control character, `@`, `:` or `/`",
                user.escape_debug()
            ));
        }
    }
    if host.is_empty() {
        return Err("the SSH URL has no host".to_owned());
    }
    if host.starts_with('-') {
        return Err(format!(
            "the host \"{host}\" starts with `-` (Git refuses it: it could pass for an ssh option)"
        ));
    }
    if host.contains(bad) {
        return Err("the host contains a space or a control character".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Result<SshTarget, String> {
        parse_ssh_url(&url::Url::parse(text).unwrap())
    }

    #[test]
    fn ssh_urls_give_user_host_and_port() {
        assert_eq!(
            url("ssh://git@git.example.com:2222/srv/a.git").unwrap(),
            SshTarget {
                user: Some("git".into()),
                host: "git.example.com".into(),
                port: 2222
            }
        );
        let plain = url("ssh://git.example.com/a.git").unwrap();
        assert_eq!((plain.user, plain.port), (None, 22));
        assert_eq!(
            url("ssh://me%2Bci@[::1]:22/a").unwrap().user.as_deref(),
            Some("me+ci")
        );
        assert_eq!(url("ssh://[::1]:2200/a").unwrap().host, "::1");
    }

    #[test]
    fn passwords_and_option_like_names_are_refused() {
        assert!(
            url("ssh://git:secret@host/a.git")
                .unwrap_err()
                .contains("password")
        );
        assert!(
            url("ssh://-oProxyCommand=x@host/a.git")
                .unwrap_err()
                .contains("starts with `-`")
        );
        assert!(
            url("ssh://git@host")
                .unwrap_err()
                .contains("no repository path")
        );
        assert!(
            parse_scp_like("git:secret@host:a.git")
                .unwrap_err()
                .contains("password")
        );
        assert!(
            parse_scp_like("-oProxyCommand=x:a.git")
                .unwrap_err()
                .contains("starts with `-`")
        );
        assert!(parse_scp_like("@host:a.git").unwrap_err().contains("empty"));
        assert!(
            parse_scp_like("git@host:")
                .unwrap_err()
                .contains("no repository path")
        );
    }

    #[test]
    fn scp_like_remotes() {
        assert_eq!(
            parse_scp_like("git@github.com:org/repo.git").unwrap(),
            SshTarget {
                user: Some("git".into()),
                host: "github.com".into(),
                port: 22
            }
        );
        assert_eq!(parse_scp_like("host:/srv/a.git").unwrap().user, None);
    }
}
