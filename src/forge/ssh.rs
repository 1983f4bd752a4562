//! SSH for Git (ls-remote and clones over `ssh://` and `user@host:path`): the host-key
//! check against an OpenSSH `known_hosts` file and the deploy key offered to the server.
//!
//! The check is strict: a host with no entry, or whose entries hold other keys, is refused
//! with the offered key's fingerprint as OpenSSH prints it (`SHA256:` and unpadded base64),
//! never accepted silently. The file is read at every connection, so an updated Secret
//! mount takes effect without a restart. Plain host patterns (with `*`, `?` and `!`
//! negation), hashed names (`|1|salt|hash`, HMAC-SHA1) and the `[host]:port` form are
//! understood; `@revoked` refuses a key; `@cert-authority` lines are ignored (host
//! certificates are not supported).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use git2::{CertificateCheckStatus, Cred, ErrorClass, ErrorCode};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::SshAuth;

/// Why a host key was refused, or the known_hosts file could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HostKeyError {
    #[error(
        "the SSH host key of {host} is unknown: the server offered {offered}, and {file} has no entry for {host}; check the fingerprint with the host's administrator, then add the key to the file (ssh.known_hosts_file), e.g. from `{keyscan}`"
    )]
    Unknown {
        host: String,
        /// `ssh-keyscan [-p PORT] HOST`
        keyscan: String,
        /// `ED25519 key SHA256:…`
        offered: String,
        file: String,
    },
    #[error(
        "the SSH host key of {host} has CHANGED: the server offered {offered}, but {file} line {line} holds another key for this host ({known}); refusing to connect (someone may be intercepting the connection, or the host key was replaced: then update the file)"
    )]
    Changed {
        host: String,
        offered: String,
        known: String,
        file: String,
        line: usize,
    },
    #[error(
        "the SSH host key of {host} ({offered}) is marked @revoked in {file} line {line}; refusing to connect"
    )]
    Revoked {
        host: String,
        offered: String,
        file: String,
        line: usize,
    },
    #[error("the server {host} offered no SSH host key to check; refusing to connect")]
    NoKey { host: String },
    #[error("cannot read the known_hosts file {file} (ssh.known_hosts_file): {message}")]
    Read { file: String, message: String },
}

/// How an entry's host field names hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hosts {
    /// Comma-separated patterns, each maybe negated with `!`.
    Patterns(Vec<(bool, String)>),
    /// `|1|salt|hash`: HMAC-SHA1 of the host name keyed with the salt.
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
}

#[derive(Debug, Clone)]
struct Entry {
    line: usize,
    marker: Marker,
    hosts: Hosts,
    /// The key in the SSH wire format (what the base64 field decodes to).
    key: Vec<u8>,
}

/// A parsed known_hosts file.
#[derive(Debug, Clone, Default)]
pub(crate) struct KnownHosts {
    entries: Vec<Entry>,
}

/// A line of a known_hosts file that cannot be used, by line number (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadLine {
    pub line: usize,
    pub problem: String,
}

impl KnownHosts {
    /// Parses `text`; lines that cannot be used are returned beside the entries (OpenSSH
    /// skips them; `validate` reports them).
    pub(crate) fn parse(text: &str) -> (KnownHosts, Vec<BadLine>) {
        let mut entries = Vec::new();
        let mut bad = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            match parse_line(trimmed) {
                Ok(Some((marker, hosts, key))) => entries.push(Entry {
                    line,
                    marker,
                    hosts,
                    key,
                }),
                Ok(None) => {}
                Err(problem) => bad.push(BadLine { line, problem }),
            }
        }
        (KnownHosts { entries }, bad)
    }

    /// Reads and parses `file`.
    pub(crate) fn load(file: &Path) -> Result<KnownHosts, HostKeyError> {
        let text = std::fs::read_to_string(file).map_err(|e| HostKeyError::Read {
            file: file.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(KnownHosts::parse(&text).0)
    }

    /// Whether `key` (wire format) is the known key of `host` at `port`. `file` names the
    /// file in messages.
    pub(crate) fn check(
        &self,
        host: &str,
        port: u16,
        key: &[u8],
        file: &Path,
    ) -> Result<(), HostKeyError> {
        let name = lookup_name(host, port);
        let offered = describe(key);
        let file = file.display().to_string();
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.hosts.matches(&name))
            .collect();
        if let Some(revoked) = matching
            .iter()
            .find(|e| e.marker == Marker::Revoked && e.key == key)
        {
            return Err(HostKeyError::Revoked {
                host: name,
                offered,
                file,
                line: revoked.line,
            });
        }
        let known: Vec<&&Entry> = matching
            .iter()
            .filter(|e| e.marker == Marker::None)
            .collect();
        if known.iter().any(|e| e.key == key) {
            return Ok(());
        }
        match known.first() {
            Some(other) => Err(HostKeyError::Changed {
                host: name,
                offered,
                known: describe(&other.key),
                file,
                line: other.line,
            }),
            None => Err(HostKeyError::Unknown {
                keyscan: if port == 22 {
                    format!("ssh-keyscan {host}")
                } else {
                    format!("ssh-keyscan -p {port} {host}")
                },
                host: name,
                offered,
                file,
            }),
        }
    }
}

/// `(marker, hosts, key)`, `None` for lines that are valid but never match (a
/// `@cert-authority` line), or what is wrong.
fn parse_line(line: &str) -> Result<Option<(Marker, Hosts, Vec<u8>)>, String> {
    let mut fields = line.split_whitespace();
    let mut first = fields.next().unwrap_or_default();
    let mut marker = Marker::None;
    if let Some(name) = first.strip_prefix('@') {
        marker = match name {
            "revoked" => Marker::Revoked,
            "cert-authority" => return Ok(None),
            other => return Err(format!("unknown marker @{other}")),
        };
        first = fields.next().unwrap_or_default();
    }
    let (Some(key_type), Some(blob)) = (fields.next(), fields.next()) else {
        return Err("expected: host patterns, key type, base64 key".to_owned());
    };
    let hosts = parse_hosts(first)?;
    let key = STANDARD
        .decode(blob)
        .map_err(|e| format!("the key is not valid base64: {e}"))?;
    let embedded = wire_string(&key).ok_or("the key is not an SSH public key blob")?;
    if embedded != key_type.as_bytes() {
        return Err(format!(
            "the key type {key_type} does not match the key, which is {}",
            String::from_utf8_lossy(embedded)
        ));
    }
    Ok(Some((marker, hosts, key)))
}

fn parse_hosts(field: &str) -> Result<Hosts, String> {
    if let Some(rest) = field.strip_prefix("|1|") {
        let (salt, hash) = rest
            .split_once('|')
            .ok_or("a hashed host name must read |1|salt|hash")?;
        let salt = STANDARD
            .decode(salt)
            .map_err(|e| format!("the hashed host's salt is not valid base64: {e}"))?;
        let hash = STANDARD
            .decode(hash)
            .map_err(|e| format!("the hashed host's hash is not valid base64: {e}"))?;
        return Ok(Hosts::Hashed { salt, hash });
    }
    if field.starts_with('|') {
        return Err("unknown hashed host format (only |1| exists)".to_owned());
    }
    let patterns: Vec<(bool, String)> = field
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.strip_prefix('!') {
            Some(negated) => (true, negated.to_ascii_lowercase()),
            None => (false, p.to_ascii_lowercase()),
        })
        .collect();
    if patterns.is_empty() {
        return Err("no host pattern".to_owned());
    }
    Ok(Hosts::Patterns(patterns))
}

impl Hosts {
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Hashed { salt, hash } => {
                let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Patterns(patterns) => {
                let name = name.to_ascii_lowercase();
                let mut matched = false;
                for (negated, pattern) in patterns {
                    if glob(pattern.as_bytes(), name.as_bytes()) {
                        if *negated {
                            return false;
                        }
                        matched = true;
                    }
                }
                matched
            }
        }
    }
}

/// OpenSSH's pattern match: `*` any run, `?` one character.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The name OpenSSH looks up: `host` on port 22, else `[host]:port`.
fn lookup_name(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The first string of an SSH wire-format blob (the key type).
fn wire_string(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4 + len)
}

/// `ED25519`, `RSA`, `ECDSA`… as OpenSSH names key types in its messages.
fn key_type_name(key: &[u8]) -> String {
    let name = wire_string(key)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    match name.as_ref() {
        "ssh-ed25519" => "ED25519".to_owned(),
        "ssh-rsa" => "RSA".to_owned(),
        "ssh-dss" => "DSA".to_owned(),
        n if n.starts_with("ecdsa-sha2-") => "ECDSA".to_owned(),
        "" => "unknown".to_owned(),
        other => other.to_owned(),
    }
}

/// `ED25519 key SHA256:…`, as OpenSSH describes a key.
fn describe(key: &[u8]) -> String {
    format!("{} key {}", key_type_name(key), fingerprint(key))
}

/// `SHA256:` and the unpadded base64 of the key's SHA-256, as `ssh-keygen -l` prints it.
pub(crate) fn fingerprint(key: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(key)))
}

/// The host-key refusal of the last connection, if any, for the caller's error message.
pub(crate) type Refusal = Arc<Mutex<Option<HostKeyError>>>;

/// A `certificate_check` callback: SSH host keys are checked against `ssh.known_hosts`
/// (a refusal is also stored in `refusal`); TLS certificates are left to libgit2.
pub(crate) fn certificate_check(
    ssh: Arc<SshAuth>,
    refusal: Refusal,
) -> impl FnMut(&git2::cert::Cert<'_>, &str) -> Result<CertificateCheckStatus, git2::Error> {
    move |cert, _host| {
        let Some(hostkey) = cert.as_hostkey() else {
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let verdict = match hostkey.hostkey() {
            None => Err(HostKeyError::NoKey {
                host: lookup_name(&ssh.host, ssh.port),
            }),
            Some(key) => KnownHosts::load(&ssh.known_hosts)
                .and_then(|known| known.check(&ssh.host, ssh.port, key, &ssh.known_hosts)),
        };
        match verdict {
            Ok(()) => Ok(CertificateCheckStatus::CertificateOk),
            Err(error) => {
                let message = error.to_string();
                if let Ok(mut slot) = refusal.lock() {
                    *slot = Some(error);
                }
                Err(git2::Error::new(
                    ErrorCode::Certificate,
                    ErrorClass::Ssh,
                    message,
                ))
            }
        }
    }
}

/// The refusal stored by [`certificate_check`], taken out.
pub(crate) fn take_refusal(refusal: &Refusal) -> Option<HostKeyError> {
    refusal.lock().ok().and_then(|mut slot| slot.take())
}

/// The deploy key (`auth.ssh_key_file`, with its passphrase) for `ssh.user`, else the
/// SSH agent's keys.
pub(crate) fn key_credentials(ssh: &SshAuth) -> Result<Cred, git2::Error> {
    match &ssh.key_file {
        Some(file) => Cred::ssh_key(
            &ssh.user,
            None,
            file,
            ssh.passphrase.as_ref().map(|p| p.expose_secret()),
        ),
        None => Cred::ssh_key_from_agent(&ssh.user),
    }
}

/// What to tell the operator when the server refused the key.
pub(crate) fn key_rejected(ssh: &SshAuth, section: &str) -> String {
    match &ssh.key_file {
        Some(file) => format!(
            "the SSH server refused the key {} ({section}.auth.ssh_key_file) for user {}; is its public key in the server's authorized keys (a deploy key of this repository)?",
            file.display(),
            ssh.user
        ),
        None => format!(
            "the SSH server refused every key of the SSH agent for user {}; set {section}.auth.ssh_key_file",
            ssh.user
        ),
    }
}

/// A key libssh2 could not load (a wrong passphrase, an unknown format), read from its
/// error: that is a configuration problem, not a network one.
pub(crate) fn key_unusable(ssh: &SshAuth, error: &git2::Error, section: &str) -> Option<String> {
    let file = ssh.key_file.as_ref()?;
    let lower = error.message().to_ascii_lowercase();
    let unusable = lower.contains("passphrase")
        || lower.contains("private key")
        || lower.contains("unable to extract public key")
        || lower.contains("unable to open");
    unusable.then(|| {
        format!(
            "cannot use the SSH key {} ({section}.auth.ssh_key_file): {} (is {section}.auth.ssh_key_passphrase_env right?)",
            file.display(),
            error.message()
        )
    })
}

/// The default known_hosts file, `~/.ssh/known_hosts`.
pub(crate) fn default_known_hosts(home: &str) -> PathBuf {
    Path::new(home).join(".ssh/known_hosts")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ssh-keygen -t ed25519` public keys (the blobs are what servers offer).
    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJxm+OiQYWdpoibTjBy/DWST9cWgpC/5TBL8yx3u5YEN";
    const KEY_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIDy/WCVNQQ26UyaeSBqD2aCAD2TjGauPxxmafkh7CA/T";

    fn blob(b64: &str) -> Vec<u8> {
        STANDARD.decode(b64).unwrap()
    }

    fn check(text: &str, host: &str, port: u16, key: &str) -> Result<(), HostKeyError> {
        let (known, bad) = KnownHosts::parse(text);
        assert!(bad.is_empty(), "{bad:?}");
        known.check(host, port, &blob(key), Path::new("/kh"))
    }

    #[test]
    fn fingerprints_read_like_ssh_keygen() {
        // `ssh-keygen -lf` of KEY_A's public key file printed this.
        assert_eq!(
            fingerprint(&blob(KEY_A)),
            "SHA256:uhRkrm/OqfOUQG/2z0mjiPVHmTlq98JS2LWk3irb/mk"
        );
        assert_ne!(fingerprint(&blob(KEY_A)), fingerprint(&blob(KEY_B)));
        assert_eq!(key_type_name(&blob(KEY_A)), "ED25519");
    }

    #[test]
    fn plain_entries_match_by_host_and_port() {
        let text = format!("git.example.com,10.0.0.1 ssh-ed25519 {KEY_A} comment\n");
        assert!(check(&text, "git.example.com", 22, KEY_A).is_ok());
        assert!(check(&text, "GIT.example.com", 22, KEY_A).is_ok());
        assert!(check(&text, "10.0.0.1", 22, KEY_A).is_ok());
        // Another port is another entry in OpenSSH's eyes.
        assert!(matches!(
            check(&text, "git.example.com", 2222, KEY_A),
            Err(HostKeyError::Unknown { .. })
        ));
        let ported = format!("[127.0.0.1]:2222 ssh-ed25519 {KEY_A}\n");
        assert!(check(&ported, "127.0.0.1", 2222, KEY_A).is_ok());
        assert!(matches!(
            check(&ported, "127.0.0.1", 22, KEY_A),
            Err(HostKeyError::Unknown { .. })
        ));
    }

    #[test]
    fn a_changed_key_is_refused_with_both_fingerprints() {
        let text = format!("# comment\n\n[127.0.0.1]:2222 ssh-ed25519 {KEY_A}\n");
        let error = check(&text, "127.0.0.1", 2222, KEY_B).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, HostKeyError::Changed { line: 3, .. }),
            "{message}"
        );
        assert!(message.contains(&fingerprint(&blob(KEY_B))), "{message}");
        assert!(message.contains(&fingerprint(&blob(KEY_A))), "{message}");
        assert!(message.contains("[127.0.0.1]:2222"), "{message}");
    }

    #[test]
    fn unknown_hosts_name_the_fingerprint_and_keyscan() {
        let message = check("", "git.example.com", 2222, KEY_A)
            .unwrap_err()
            .to_string();
        assert!(message.contains(&fingerprint(&blob(KEY_A))), "{message}");
        assert!(message.contains("ED25519"), "{message}");
        assert!(
            message.contains("ssh-keyscan -p 2222 git.example.com"),
            "{message}"
        );
    }

    #[test]
    fn hashed_entries_match() {
        // `ssh-keygen -H` form: |1|base64(salt)|base64(HMAC-SHA1(salt, name)).
        let salt = b"0123456789abcdefghij";
        let hash_of = |name: &str| {
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
            mac.update(name.as_bytes());
            STANDARD.encode(mac.finalize().into_bytes())
        };
        let text = format!(
            "|1|{}|{} ssh-ed25519 {KEY_A}\n",
            STANDARD.encode(salt),
            hash_of("[git.example.com]:2222")
        );
        assert!(check(&text, "git.example.com", 2222, KEY_A).is_ok());
        assert!(matches!(
            check(&text, "git.example.com", 2222, KEY_B),
            Err(HostKeyError::Changed { .. })
        ));
        assert!(matches!(
            check(&text, "other.example.com", 2222, KEY_A),
            Err(HostKeyError::Unknown { .. })
        ));
    }

    #[test]
    fn a_line_hashed_by_ssh_keygen_matches() {
        // `ssh-keygen -H -f` of a file holding `[127.0.0.1]:2222 ssh-ed25519 KEY_A`.
        let text = format!(
            "|1|0+j3tHYU2xEwyET19KaVPoqWG+4=|Mv/NnxUiWPyV1hCUPWVGEkyAT0s= ssh-ed25519 {KEY_A}\n"
        );
        assert!(check(&text, "127.0.0.1", 2222, KEY_A).is_ok());
        assert!(matches!(
            check(&text, "127.0.0.1", 2223, KEY_A),
            Err(HostKeyError::Unknown { .. })
        ));
    }

    #[test]
    fn wildcards_and_negation() {
        let text = format!("*.example.com,!evil.example.com ssh-ed25519 {KEY_A}\n");
        assert!(check(&text, "git.example.com", 22, KEY_A).is_ok());
        assert!(matches!(
            check(&text, "evil.example.com", 22, KEY_A),
            Err(HostKeyError::Unknown { .. })
        ));
        assert!(glob(b"git?.example.*", b"git1.example.org"));
        assert!(!glob(b"git?.example.*", b"git12.example.org"));
    }

    #[test]
    fn revoked_keys_are_refused_even_beside_a_matching_entry() {
        let text = format!("@revoked * ssh-ed25519 {KEY_A}\ngit.example.com ssh-ed25519 {KEY_A}\n");
        assert!(matches!(
            check(&text, "git.example.com", 22, KEY_A),
            Err(HostKeyError::Revoked { line: 1, .. })
        ));
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let text = format!(
            "ok.example.com ssh-ed25519 {KEY_A}\nbroken-line\nx ssh-rsa {KEY_A}\ny ssh-ed25519 !!!\n@cert-authority *.example.com ssh-ed25519 {KEY_B}\n@bogus x ssh-ed25519 {KEY_A}\n"
        );
        let (known, bad) = KnownHosts::parse(&text);
        assert_eq!(known.entries.len(), 1);
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 6], "{bad:?}");
        assert!(bad[1].problem.contains("does not match"), "{bad:?}");
    }
}
