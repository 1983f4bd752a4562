//! Change detection: what one observation of a repository means against what is known.
//!
//! A pure function, so that every rule is unit-tested without a forge or a clock:
//! - a branch never seen before is a baseline, not a change, unless it matches a pattern
//!   whose first listing was already taken (then it is a new branch: previous SHA empty);
//! - a branch whose head differs from the newest known SHA (pending, in flight, or
//!   stored) is a change;
//! - a pattern branch missing from a complete listing is gone; exact branches are never
//!   "gone" from a listing (they are checked one by one, and a 404 is an error);
//! - anything the forge did not answer for is unknown and changes nothing.

use crate::config::Repository;
use crate::forge::{Observation, Sha};

use super::state::RepoState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub repository: String,
    pub branch: String,
    pub previous: Option<Sha>,
    pub sha: Sha,
}

#[derive(Debug, Default, PartialEq)]
pub struct Detection {
    pub changes: Vec<Change>,
    /// Branches seen for the first time: recorded, not deployed.
    pub baselines: Vec<(String, Sha)>,
    /// Pattern branches that disappeared: dropped from state.
    pub gone: Vec<String>,
    /// Patterns whose listing is now the baseline.
    pub patterns_baselined: Vec<String>,
}

/// `in_flight` answers the SHA of a branch that is pending or being deployed, which is
/// newer than the stored one.
pub fn detect(
    repo: &Repository,
    observation: &Observation,
    stored: Option<&RepoState>,
    in_flight: impl Fn(&str) -> Option<Sha>,
) -> Detection {
    let mut out = Detection::default();
    let monitor = &repo.monitor;
    let baselined = |branch: &str| {
        stored.is_some_and(|s| {
            monitor
                .patterns()
                .filter(|p| s.baselined_patterns.contains(&p.glob))
                .any(|p| p.matches(branch))
        })
    };
    for (branch, sha) in &observation.heads {
        if !monitor.watches(branch) {
            continue;
        }
        let stored_sha = stored
            .and_then(|s| s.branches.get(branch))
            .map(|b| b.sha.clone());
        let known = in_flight(branch).or_else(|| stored_sha.clone());
        match known {
            Some(known) if &known == sha => {}
            Some(known) => out.changes.push(change(repo, branch, Some(known), sha)),
            None if is_exact(repo, branch) || !baselined(branch) => {
                out.baselines.push((branch.clone(), sha.clone()))
            }
            None => out.changes.push(change(repo, branch, None, sha)),
        }
    }
    if observation.listing_complete {
        if let Some(stored) = stored {
            out.gone = stored
                .branches
                .keys()
                .filter(|b| !is_exact(repo, b) && !observation.heads.contains_key(*b))
                .cloned()
                .collect();
        }
        out.patterns_baselined = monitor
            .patterns()
            .map(|p| p.glob.clone())
            .filter(|g| !stored.is_some_and(|s| s.baselined_patterns.contains(g)))
            .collect();
    }
    out
}

fn is_exact(repo: &Repository, branch: &str) -> bool {
    repo.monitor.exact_branches().any(|b| b == branch)
}

fn change(repo: &Repository, branch: &str, previous: Option<Sha>, sha: &Sha) -> Change {
    Change {
        repository: repo.name.clone(),
        branch: branch.to_owned(),
        previous,
        sha: sha.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Env, load_str};
    use crate::monitor::state::BranchState;

    fn sha(c: char) -> Sha {
        Sha::parse(&c.to_string().repeat(40)).unwrap()
    }

    fn repo() -> Repository {
        let yaml = "groups: {g: }\nrepositories:\n  - name: r\n    group: g\n    monitor: {repo_url: /x, branches: [main, \"release/*\"], repo_type: git}\n    deploy: {qa_repo_url: /q, qa_repo_branch: main, commands: [x]}\n";
        let config = load_str(yaml, &Env::fixed::<[(&str, &str); 0], _, _>([]))
            .config
            .unwrap();
        config.repositories[0].as_ref().clone()
    }

    fn observed(heads: &[(&str, char)], complete: bool) -> Observation {
        Observation {
            heads: heads
                .iter()
                .map(|(b, c)| (b.to_string(), sha(*c)))
                .collect(),
            failures: Vec::new(),
            listing_complete: complete,
        }
    }

    fn stored(branches: &[(&str, char)], patterns: &[&str]) -> RepoState {
        RepoState {
            branches: branches
                .iter()
                .map(|(b, c)| {
                    (
                        b.to_string(),
                        BranchState {
                            sha: sha(*c),
                            seen_at: String::new(),
                            last_deploy: None,
                        },
                    )
                })
                .collect(),
            baselined_patterns: patterns.iter().map(|p| p.to_string()).collect(),
            pending: Default::default(),
            claims: Default::default(),
        }
    }

    #[test]
    fn first_sight_is_a_baseline_for_everything() {
        let d = detect(
            &repo(),
            &observed(&[("main", 'a'), ("release/1", 'b')], true),
            None,
            |_| None,
        );
        assert!(d.changes.is_empty());
        assert_eq!(d.baselines.len(), 2);
        assert_eq!(d.patterns_baselined, ["release/*"]);
    }

    #[test]
    fn moved_branch_is_a_change_with_previous_sha() {
        let s = stored(&[("main", 'a')], &["release/*"]);
        let d = detect(&repo(), &observed(&[("main", 'b')], true), Some(&s), |_| {
            None
        });
        assert_eq!(
            d.changes,
            [Change {
                repository: "r".into(),
                branch: "main".into(),
                previous: Some(sha('a')),
                sha: sha('b')
            }]
        );
    }

    #[test]
    fn unchanged_branch_is_nothing() {
        let s = stored(&[("main", 'a')], &["release/*"]);
        let d = detect(&repo(), &observed(&[("main", 'a')], true), Some(&s), |_| {
            None
        });
        assert_eq!(d, Detection::default());
    }

    #[test]
    fn new_branch_matching_a_baselined_pattern_is_a_change() {
        let s = stored(&[("main", 'a')], &["release/*"]);
        let d = detect(
            &repo(),
            &observed(&[("main", 'a'), ("release/2", 'c')], true),
            Some(&s),
            |_| None,
        );
        assert_eq!(d.changes.len(), 1);
        assert_eq!(d.changes[0].previous, None);
    }

    #[test]
    fn in_flight_sha_is_not_a_change_again() {
        let s = stored(&[("main", 'a')], &[]);
        let d = detect(&repo(), &observed(&[("main", 'b')], false), Some(&s), |b| {
            (b == "main").then(|| sha('b'))
        });
        assert!(d.changes.is_empty());
        let d = detect(&repo(), &observed(&[("main", 'c')], false), Some(&s), |b| {
            (b == "main").then(|| sha('b'))
        });
        assert_eq!(d.changes[0].previous, Some(sha('b')));
    }

    #[test]
    fn vanished_pattern_branch_is_gone_only_with_a_complete_listing() {
        let s = stored(&[("main", 'a'), ("release/1", 'b')], &["release/*"]);
        let d = detect(&repo(), &observed(&[("main", 'a')], true), Some(&s), |_| {
            None
        });
        assert_eq!(d.gone, ["release/1"]);
        let d = detect(
            &repo(),
            &observed(&[("main", 'a')], false),
            Some(&s),
            |_| None,
        );
        assert!(d.gone.is_empty());
    }

    #[test]
    fn exact_branch_missing_from_answer_is_unknown_not_gone() {
        let s = stored(&[("main", 'a')], &["release/*"]);
        let d = detect(&repo(), &observed(&[], true), Some(&s), |_| None);
        assert!(d.gone.is_empty() && d.changes.is_empty());
    }

    #[test]
    fn unwatched_branches_are_ignored() {
        let d = detect(
            &repo(),
            &observed(&[("feature/x", 'a')], true),
            None,
            |_| None,
        );
        assert!(d.baselines.is_empty());
    }
}
