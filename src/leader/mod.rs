//! Leader election on a `coordination.k8s.io/v1` Lease: which replica of `watch` polls and
//! deploys. [`decide`] is the pure rule (what to do with the Lease as observed); the
//! `lease` module talks to the API server and keeps the [`Elector`]'s view.
//!
//! Every write carries the `resourceVersion` that was read, so two replicas can never both
//! believe they acquired the same term: the API server answers the slower one `409`.
//! Expiry is judged on this replica's monotonic clock — from when it first saw the
//! Lease's current version — never on the `renewTime` another machine wrote, so clock
//! skew between nodes cannot make a live Lease look expired.

mod lease;

use std::time::Duration;

use tokio::time::Instant;

pub use lease::Elector;

/// The Lease as read from the API server, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `spec.holderIdentity`; `None` or empty when released.
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds` as written by the holder.
    pub lease_duration: Duration,
    pub resource_version: String,
}

/// What to do next with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it with us as holder.
    Create,
    /// We hold it: renew it (write with the observed `resourceVersion`).
    Renew,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver { from: Option<String> },
    /// Someone else holds it; it expires `expires_in` from now unless renewed.
    Follow {
        holder: String,
        expires_in: Duration,
    },
}

/// The election rule. `unchanged_since` is when this replica first saw the Lease's
/// current `resourceVersion`: a holder that keeps renewing changes the version, so a
/// version unchanged for a whole lease duration means the holder stopped.
pub fn decide(
    me: &str,
    observed: Option<&Observed>,
    unchanged_since: Instant,
    now: Instant,
) -> Decision {
    let Some(lease) = observed else {
        return Decision::Create;
    };
    match lease.holder.as_deref().filter(|h| !h.is_empty()) {
        None => Decision::TakeOver { from: None },
        Some(holder) if holder == me => Decision::Renew,
        Some(holder) => {
            let expires = unchanged_since + lease.lease_duration;
            if now >= expires {
                Decision::TakeOver {
                    from: Some(holder.to_owned()),
                }
            } else {
                Decision::Follow {
                    holder: holder.to_owned(),
                    expires_in: expires - now,
                }
            }
        }
    }
}

/// This replica's identity in the Lease: `POD_NAME` (the downward API), else the host
/// name and process id.
pub fn identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME") {
        if !name.trim().is_empty() {
            return name.trim().to_owned();
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sentry".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, secs: u64, rv: &str) -> Observed {
        Observed {
            holder: holder.map(str::to_owned),
            lease_duration: Duration::from_secs(secs),
            resource_version: rv.into(),
        }
    }

    /// One row: what was observed, how long ago its version first appeared, the decision.
    struct Row {
        observed: Option<Observed>,
        age: Duration,
        want: Decision,
    }

    #[tokio::test(start_paused = true)]
    async fn the_decision_over_a_table_of_observed_leases() {
        let s = Duration::from_secs;
        let follow = |holder: &str, left: u64| Decision::Follow {
            holder: holder.into(),
            expires_in: s(left),
        };
        let rows = [
            Row {
                observed: None,
                age: s(0),
                want: Decision::Create,
            },
            Row {
                observed: Some(lease(Some("me"), 15, "1")),
                age: s(0),
                want: Decision::Renew,
            },
            // Our own Lease is renewed even when it looks expired: the write's
            // resourceVersion decides whether it is still ours.
            Row {
                observed: Some(lease(Some("me"), 15, "1")),
                age: s(60),
                want: Decision::Renew,
            },
            Row {
                observed: Some(lease(None, 15, "2")),
                age: s(0),
                want: Decision::TakeOver { from: None },
            },
            Row {
                observed: Some(lease(Some(""), 15, "2")),
                age: s(0),
                want: Decision::TakeOver { from: None },
            },
            Row {
                observed: Some(lease(Some("other"), 15, "3")),
                age: s(0),
                want: follow("other", 15),
            },
            Row {
                observed: Some(lease(Some("other"), 15, "3")),
                age: s(14),
                want: follow("other", 1),
            },
            Row {
                observed: Some(lease(Some("other"), 15, "3")),
                age: s(15),
                want: Decision::TakeOver {
                    from: Some("other".into()),
                },
            },
            // The holder's own lease duration counts, not ours.
            Row {
                observed: Some(lease(Some("other"), 3, "4")),
                age: s(2),
                want: follow("other", 1),
            },
            Row {
                observed: Some(lease(Some("other"), 3, "4")),
                age: s(3),
                want: Decision::TakeOver {
                    from: Some("other".into()),
                },
            },
        ];
        for (i, row) in rows.iter().enumerate() {
            let seen = Instant::now();
            tokio::time::advance(row.age).await;
            let got = decide("me", row.observed.as_ref(), seen, Instant::now());
            assert_eq!(got, row.want, "row {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_lease_restarts_the_expiry_clock() {
        let mut seen = Instant::now();
        let mut current = lease(Some("other"), 3, "1");
        for version in 2..10 {
            tokio::time::advance(Duration::from_secs(2)).await;
            let renewed = lease(Some("other"), 3, &version.to_string());
            if renewed.resource_version != current.resource_version {
                seen = Instant::now();
                current = renewed;
            }
            let got = decide("me", Some(&current), seen, Instant::now());
            assert!(matches!(got, Decision::Follow { .. }), "{got:?}");
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            decide("me", Some(&current), seen, Instant::now()),
            Decision::TakeOver {
                from: Some("other".into())
            }
        );
    }
}
