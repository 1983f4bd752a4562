//! Forward proxies for every outgoing connection of the forges: API requests (reqwest),
//! `ls-remote` and clones (libgit2).
//!
//! Without a `proxy:` key both follow the environment: reqwest reads `HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` itself, and libgit2 is asked for its automatic
//! detection (`ProxyOptions::auto`: `https_proxy`/`HTTPS_PROXY` for https remotes,
//! `http_proxy`/`HTTP_PROXY` for http ones, and `no_proxy`/`NO_PROXY`). A `proxy:` key
//! overrides the environment for all three; libgit2 does not apply `NO_PROXY` to a proxy
//! it is given, so [`bypasses`] does that here, with the same list reqwest receives. SSH
//! remotes never go through a proxy (libgit2's SSH transport has none).
//!
//! libgit2's options are process-wide like its trust: recorded by `Forges::new`.

use std::sync::OnceLock;

use secrecy::ExposeSecret;

use crate::config::ProxyConfig;

/// The `proxy:` of the configuration, recorded by the first `Forges::new`.
static GIT_PROXY: OnceLock<Option<ProxyConfig>> = OnceLock::new();

/// Records `proxy` for libgit2 (the first call wins; one configuration per process).
pub(crate) fn set_git_proxy(proxy: Option<&ProxyConfig>) {
    let _ = GIT_PROXY.set(proxy.cloned());
}

/// The proxy options for a libgit2 connection to `url`.
pub(crate) fn git_options(url: &str) -> git2::ProxyOptions<'static> {
    let mut options = git2::ProxyOptions::new();
    match GIT_PROXY.get().and_then(Option::as_ref) {
        None => {
            options.auto();
        }
        Some(proxy) => {
            let host = url::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned));
            // Local paths, file:// and scp-like SSH remotes have no http host: no proxy.
            if let Some(host) = host {
                if !bypasses(&proxy.no_proxy, &host) {
                    options.url(proxy.url.expose_secret());
                }
            }
        }
    }
    options
}

/// The proxy for reqwest: `None` leaves reqwest to the environment.
pub(crate) fn reqwest_proxy(proxy: &ProxyConfig) -> reqwest::Result<reqwest::Proxy> {
    let no_proxy = reqwest::NoProxy::from_string(&proxy.no_proxy.join(","));
    Ok(reqwest::Proxy::all(proxy.url.expose_secret())?.no_proxy(no_proxy))
}

/// Whether `host` is exempt from the proxy by `no_proxy`, as curl reads `NO_PROXY`: `*`
/// exempts every host; `example.com` and `.example.com` exempt that domain and its
/// subdomains; an IP address exempts itself. Case-insensitive; a `:port` on an entry is
/// ignored.
pub(crate) fn bypasses(no_proxy: &[String], host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    no_proxy.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        let entry = match entry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default().to_owned(),
            None if entry.matches(':').count() == 1 => {
                entry.split(':').next().unwrap_or_default().to_owned()
            }
            None => entry,
        };
        let domain = entry.trim_start_matches('.').trim_end_matches('.');
        entry == "*"
            || (!domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|rest| rest.ends_with('.'))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| (*e).to_owned()).collect()
    }

    #[test]
    fn no_proxy_reads_like_curl() {
        let no = list(&[
            ".corp.example",
            "git.other.example:8443",
            "10.1.2.3",
            "[::1]",
        ]);
        assert!(bypasses(&no, "corp.example"));
        assert!(bypasses(&no, "git.CORP.example"));
        assert!(!bypasses(&no, "notcorp.example"));
        assert!(bypasses(&no, "git.other.example"));
        assert!(!bypasses(&no, "other.example"));
        assert!(bypasses(&no, "10.1.2.3"));
        assert!(!bypasses(&no, "10.1.2.30"));
        assert!(bypasses(&no, "[::1]"));
        assert!(!bypasses(&no, "127.0.0.1"));
        assert!(bypasses(&list(&["*"]), "anything.example"));
        assert!(!bypasses(&[], "anything.example"));
    }
}
