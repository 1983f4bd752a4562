//! The web dashboard of `watch`: server-rendered HTML pages built with `write!` into one
//! string — no template engine, no Node build, no CDN; it works offline.
//!
//! `/` lists the groups, `/groups/{name}` a group's repositories, branches and recent
//! runs, `/runs/{run_id}` one run with each unit's status, timing and (masked) output
//! tail. Every page is complete without JavaScript; a small inline script listens to
//! `/api/v1/events` and swaps in a fresh copy of the page's `<main>` after a transition,
//! so a new deploy appears without a reload. Every remote or configured string goes
//! through [`esc`].

use std::fmt::Write as _;

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::{BranchView, GroupView, Leading, LiveSlot, RepoView, StatusView, status_view};
use crate::history::{RunRecord, UnitRecord, relative};

/// Runs listed on a group page.
const RUNS_ON_GROUP_PAGE: usize = 20;

pub fn routes() -> Router<LiveSlot> {
    Router::new()
        .route("/", get(index))
        .route("/groups/{name}", get(group))
        .route("/runs/{run_id}", get(run))
}

async fn index(Leading(live): Leading) -> Response {
    html(StatusCode::OK, &render_index(&status_view(&live)))
}

async fn group(Leading(live): Leading, Path(name): Path<String>) -> Response {
    let view = status_view(&live);
    let runs = live.history.runs(Some(&name), RUNS_ON_GROUP_PAGE);
    match render_group(&view, &name, &runs) {
        Some(page) => html(StatusCode::OK, &page),
        None => html(
            StatusCode::NOT_FOUND,
            &layout(
                "Not found",
                &format!("<p>No group named <code>{}</code>.</p>", esc(&name)),
            ),
        ),
    }
}

async fn run(Leading(live): Leading, Path(run_id): Path<String>) -> Response {
    match live.history.run(&run_id) {
        Some(r) => html(StatusCode::OK, &render_run(&r)),
        None => html(
            StatusCode::NOT_FOUND,
            &layout(
                "Not found",
                &format!(
                    "<p>No run <code>{}</code> in the history (the last 50 runs per group are kept).</p>",
                    esc(&run_id)
                ),
            ),
        ),
    }
}

fn html(code: StatusCode, page: &str) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page.to_owned(),
    )
        .into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Path segments are percent-encoded: group names and run ids are plain, but never trust.
fn seg(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

const STYLE: &str = "
:root{color-scheme:light dark;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--run:#0969da;--mute:#6e7781;--line:#d0d7de}
@media (prefers-color-scheme:dark){:root{--ok:#3fb950;--bad:#f85149;--warn:#d29922;--run:#58a6ff;--mute:#8b949e;--line:#30363d}}
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 1rem}
header{display:flex;gap:1rem;align-items:baseline;border-bottom:1px solid var(--line);padding:.6rem 0}
header a{font-weight:600;text-decoration:none}#live{color:var(--mute);font-size:.85em;margin-left:auto}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.85em;color:var(--mute)}tbody th{font-size:1em;color:inherit}code,pre{font:13px/1.4 ui-monospace,monospace}
pre{overflow:auto;max-height:24rem;padding:.5rem;border:1px solid var(--line);white-space:pre-wrap}
.s{font-weight:600}.succeeded,.idle{color:var(--ok)}.failed,.timed_out,.setup_failed{color:var(--bad)}
.skipped,.cancelled,.retry_waiting,.pending{color:var(--warn)}.running,.queued{color:var(--run)}.mute{color:var(--mute)}
@media (max-width:700px){.wide{display:none}table{font-size:.9em}}
";

/// Refreshes `<main>` from the server after each event (debounced); counts the updates
/// in `data-updates` so that tests can tell a live update from a reload.
const SCRIPT: &str = "
(function(){if(!window.EventSource||!window.fetch)return;
var live=document.getElementById('live'),timer=null,n=0;
function refresh(){timer=null;fetch(location.href,{credentials:'same-origin'}).then(function(r){return r.text()}).then(function(t){
var next=new DOMParser().parseFromString(t,'text/html').querySelector('main'),main=document.querySelector('main');
if(next&&main){main.innerHTML=next.innerHTML;n++;main.setAttribute('data-updates',n);}}).catch(function(){});}
var es=new EventSource('/api/v1/events');es.onopen=function(){live.textContent='live'};es.onerror=function(){live.textContent='reconnecting…'};
['run_started','unit_started','unit_ended','run_ended','lagged'].forEach(function(k){es.addEventListener(k,function(){if(!timer)timer=setTimeout(refresh,250);});});
})();
";

fn layout(title: &str, main: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · Sentry</title><style>{STYLE}</style></head><body>\
         <header><a href=\"/\">Sentry</a><span class=\"mute\">{title}</span>\
         <span id=\"live\" aria-live=\"polite\">static</span></header>\
         <main data-updates=\"0\">{main}</main><script>{SCRIPT}</script></body></html>",
        title = esc(title)
    )
}

/// A status word with its colour class; the word carries the meaning, the colour helps.
fn badge(status: &str) -> String {
    let s = esc(status);
    format!("<span class=\"s {s}\">{}</span>", s.replace('_', " "))
}

fn secs(d: Option<f64>) -> String {
    d.map_or_else(String::new, |d| {
        if d < 60.0 {
            format!("{d:.1} s")
        } else {
            crate::history::short_duration(d as i64)
        }
    })
}

fn when(at: Option<&str>) -> String {
    at.map_or_else(String::new, |a| {
        format!(
            "<time datetime=\"{0}\" title=\"{0}\">{1}</time>",
            esc(a),
            esc(&relative(a))
        )
    })
}

fn sha_link(sha: &str, url: Option<&str>) -> String {
    let short: String = sha.chars().take(8).collect();
    match url {
        Some(u) => format!("<a href=\"{}\"><code>{}</code></a>", esc(u), esc(&short)),
        None => format!("<code title=\"{}\">{}</code>", esc(sha), esc(&short)),
    }
}

fn run_link(run_id: &str) -> String {
    format!(
        "<a href=\"/runs/{}\"><code>{}</code></a>",
        seg(run_id),
        esc(run_id)
    )
}

pub fn render_index(view: &StatusView) -> String {
    let mut m = String::with_capacity(4096 + view.groups.len() * 400);
    m.push_str("<h1>Groups</h1><table><thead><tr><th scope=\"col\">Group</th><th scope=\"col\">State</th>\
        <th scope=\"col\">Last run</th><th scope=\"col\">Result</th><th scope=\"col\">Duration</th>\
        <th scope=\"col\" class=\"wide\">Repositories</th><th scope=\"col\" class=\"wide\">Waiting</th></tr></thead><tbody>");
    for g in &view.groups {
        group_row(&mut m, g);
    }
    m.push_str("</tbody></table>");
    if !view.rate_limits.is_empty() {
        m.push_str("<h2>API hosts</h2><table><thead><tr><th scope=\"col\">Host</th><th scope=\"col\">Remaining</th>\
            <th scope=\"col\">Reset</th><th scope=\"col\">Paused until</th></tr></thead><tbody>");
        for l in &view.rate_limits {
            let _ = write!(
                m,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.host),
                l.remaining.map_or_else(|| "-".into(), |r| r.to_string()),
                when(l.reset.as_deref()),
                l.paused_until
                    .as_deref()
                    .map_or_else(|| "-".into(), |p| when(Some(p))),
            );
        }
        m.push_str("</tbody></table>");
    }
    let _ = write!(
        m,
        "<p class=\"mute\">Sentry {} · last poll {} · <a href=\"/api/v1/status\">JSON</a></p>",
        esc(&view.version),
        view.last_cycle
            .as_deref()
            .map_or_else(|| "not yet".into(), |c| when(Some(c)))
    );
    layout("Groups", &m)
}

fn group_row(m: &mut String, g: &GroupView) {
    let (last, result, duration) = match &g.last_run {
        Some(r) => (
            format!("{} {}", run_link(&r.run_id), when(r.ended_at.as_deref())),
            badge(&r.status),
            secs(r.duration_secs),
        ),
        None => (
            "<span class=\"mute\">none yet</span>".into(),
            String::new(),
            String::new(),
        ),
    };
    let state = match &g.running_run {
        Some(id) => format!("{} {}", badge("running"), run_link(id)),
        None => badge(&g.state),
    };
    let waiting = g.units.pending.len() + g.units.deferred.len();
    let _ = write!(
        m,
        "<tr><th scope=\"row\"><a href=\"/groups/{}\">{}</a></th><td>{state}</td><td>{last}</td><td>{result}</td>\
         <td>{duration}</td><td class=\"wide\">{}</td><td class=\"wide\">{}</td></tr>",
        seg(&g.name),
        esc(&g.name),
        g.repositories,
        if waiting == 0 {
            String::from("-")
        } else {
            waiting.to_string()
        },
    );
}

/// The group page, or `None` for an unknown group.
pub fn render_group(view: &StatusView, name: &str, runs: &[RunRecord]) -> Option<String> {
    let g = view.groups.iter().find(|g| g.name == name)?;
    let repos: Vec<&RepoView> = view
        .repositories
        .iter()
        .filter(|r| r.group == name)
        .collect();
    let mut m = String::with_capacity(8192 + repos.len() * 600);
    let _ = write!(
        m,
        "<h1>{}</h1><p>{} · {} · {} repositories</p>",
        esc(&g.name),
        badge(&g.state),
        esc(&g.strategy),
        g.repositories
    );
    if !g.units.deferred.is_empty() {
        m.push_str("<h2>Waiting for a retry</h2><ul>");
        for d in &g.units.deferred {
            let (u, secs_left) = (&d.unit, d.retry_in_secs);
            let _ = write!(
                m,
                "<li>{}@{} <code>{}</code>: retry in {}</li>",
                esc(&u.repository),
                esc(&u.branch),
                esc(&u.sha.chars().take(8).collect::<String>()),
                crate::history::short_duration(i64::try_from(secs_left).unwrap_or(i64::MAX))
            );
        }
        m.push_str("</ul>");
    }
    m.push_str("<h2>Recent runs</h2>");
    runs_table(&mut m, runs);
    m.push_str("<h2>Repositories</h2><table><thead><tr><th scope=\"col\">Repository</th><th scope=\"col\">Branch</th>\
        <th scope=\"col\">Handled</th><th scope=\"col\">Last deploy</th><th scope=\"col\">Pending</th></tr></thead><tbody>");
    for repo in repos {
        repo_rows(&mut m, repo);
    }
    m.push_str("</tbody></table>");
    Some(layout(&g.name, &m))
}

fn runs_table(m: &mut String, runs: &[RunRecord]) {
    if runs.is_empty() {
        m.push_str("<p class=\"mute\">No runs yet.</p>");
        return;
    }
    m.push_str("<table><thead><tr><th scope=\"col\">Run</th><th scope=\"col\">Result</th><th scope=\"col\">Trigger</th>\
        <th scope=\"col\">Started</th><th scope=\"col\">Duration</th><th scope=\"col\" class=\"wide\">Units</th></tr></thead><tbody>");
    for r in runs {
        let _ = write!(
            m,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"wide\">{}</td></tr>",
            run_link(&r.run_id),
            badge(&r.status),
            esc(&r.trigger),
            when(Some(&r.started_at)),
            secs(r.duration_secs),
            r.units.len()
        );
    }
    m.push_str("</tbody></table>");
}

fn repo_rows(m: &mut String, repo: &RepoView) {
    let span = repo.branches.len().max(1);
    let backoff = repo
        .backoff_secs
        .map(|s| format!("<br><span class=\"s pending\">backing off</span> <span class=\"mute\">next check in {s} s</span>"))
        .unwrap_or_default();
    let _ = write!(
        m,
        "<tr><th scope=\"row\" rowspan=\"{span}\">{}<br><span class=\"mute\">{}</span>{backoff}</th>",
        esc(&repo.name),
        esc(&repo.repo_type)
    );
    if repo.branches.is_empty() {
        m.push_str("<td colspan=\"4\" class=\"mute\">no branch seen yet</td></tr>");
    }
    for (i, b) in repo.branches.iter().enumerate() {
        if i > 0 {
            m.push_str("<tr>");
        }
        branch_cells(m, b);
        m.push_str("</tr>");
    }
}

fn branch_cells(m: &mut String, b: &BranchView) {
    let handled = b.sha.as_deref().map_or_else(
        || "<span class=\"mute\">-</span>".into(),
        |s| sha_link(s, b.commit_url.as_deref()),
    );
    let last = b.last_deploy.as_ref().map_or_else(
        || "<span class=\"mute\">baseline</span>".into(),
        |d| {
            format!(
                "{} {} {}",
                badge(&d.result),
                when(Some(&d.at)),
                run_link(&d.run_id)
            )
        },
    );
    let pending = b.pending.as_ref().map_or_else(
        || "-".into(),
        |p| {
            let next = p
                .next_try_at
                .as_deref()
                .map_or_else(|| "after the next start".into(), |n| format!("next try {}", when(Some(n))));
            format!(
                "<code>{}</code> <span class=\"s pending\">pending</span>: {} <span class=\"mute\">({next})</span>",
                esc(&p.sha.as_str().chars().take(8).collect::<String>()),
                esc(&p.reason)
            )
        },
    );
    let _ = write!(
        m,
        "<td>{}</td><td>{handled}</td><td>{last}</td><td>{pending}</td>",
        esc(&b.branch)
    );
}

pub fn render_run(r: &RunRecord) -> String {
    let mut m = String::with_capacity(
        4096 + r
            .units
            .iter()
            .map(|u| u.output_tail.len() + 512)
            .sum::<usize>(),
    );
    let _ = write!(
        m,
        "<h1>Run <code>{}</code></h1><p>{} · group <a href=\"/groups/{}\">{}</a> · trigger {}{} · started {} · {}</p>",
        esc(&r.run_id),
        badge(&r.status),
        seg(&r.group),
        esc(&r.group),
        esc(&r.trigger),
        r.user
            .as_deref()
            .map(|u| format!(" by {}", esc(u)))
            .unwrap_or_default(),
        when(Some(&r.started_at)),
        secs(r.duration_secs),
    );
    m.push_str("<table><thead><tr><th scope=\"col\">Repository</th><th scope=\"col\">Branch</th><th scope=\"col\">Commit</th>\
        <th scope=\"col\">Status</th><th scope=\"col\">Duration</th><th scope=\"col\">Exit</th><th scope=\"col\">Failing command or reason</th></tr></thead><tbody>");
    for u in &r.units {
        unit_row(&mut m, u);
    }
    m.push_str("</tbody></table>");
    for u in r.units.iter().filter(|u| !u.output_tail.is_empty()) {
        let open = if matches!(u.status.as_str(), "failed" | "timed_out" | "setup_failed") {
            " open"
        } else {
            ""
        };
        let _ = write!(
            m,
            "<details{open}><summary>Output of {}@{} ({})</summary><pre>{}</pre></details>",
            esc(&u.repository),
            esc(&u.branch),
            badge(&u.status),
            esc(&u.output_tail)
        );
    }
    layout(&format!("Run {}", r.run_id), &m)
}

fn unit_row(m: &mut String, u: &UnitRecord) {
    let why = u
        .failed_command
        .as_deref()
        .or(u.reason.as_deref())
        .unwrap_or("");
    let _ = write!(
        m,
        "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
        esc(&u.repository),
        esc(&u.branch),
        sha_link(&u.sha, u.commit_url.as_deref()),
        badge(&u.status),
        secs(u.duration_secs),
        u.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        esc(why)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GroupView, RunSummary};
    use crate::forge::Sha;
    use crate::monitor::scheduler::GroupSnapshot;
    use crate::monitor::state::{DeployRecord, PendingRecord};

    fn view(repos: usize) -> StatusView {
        let sha = Sha::parse(&"c".repeat(40)).unwrap();
        StatusView {
            version: "0.1.0".into(),
            generated_at: "2026-11-29T10:00:00Z".into(),
            last_cycle: Some("2026-11-29T10:00:00Z".into()),
            leader: None,
            groups: vec![GroupView {
                name: "g".into(),
                strategy: "parallel".into(),
                state: "idle".into(),
                running_run: None,
                units: GroupSnapshot::default(),
                repositories: repos,
                last_run: Some(RunSummary {
                    run_id: "20261129T100000Z-abcdef".into(),
                    status: "failed".into(),
                    trigger: "poll".into(),
                    started_at: "2026-11-29T10:00:00Z".into(),
                    ended_at: Some("2026-11-29T10:00:02Z".into()),
                    duration_secs: Some(2.0),
                }),
            }],
            repositories: (0..repos)
                .map(|i| RepoView {
                    name: format!("repo-{i}<x>"),
                    group: "g".into(),
                    repo_type: "github".into(),
                    backoff_secs: (i % 10 == 0).then_some(30),
                    branches: vec![BranchView {
                        branch: "main".into(),
                        sha: Some(sha.as_str().into()),
                        commit_url: Some(format!("https://github.com/o/r{i}/commit/{sha}")),
                        seen_at: Some("2026-11-29T10:00:00Z".into()),
                        last_deploy: Some(DeployRecord {
                            sha: sha.clone(),
                            result: "succeeded".into(),
                            at: "2026-11-29T10:00:00Z".into(),
                            run_id: "20261129T100000Z-abcdef".into(),
                        }),
                        pending: (i % 7 == 0).then(|| PendingRecord {
                            sha: sha.clone(),
                            reason: "cannot clone".into(),
                            tries: 2,
                            next_try_at: Some("2026-11-29T10:05:00Z".into()),
                            since: "2026-11-29T10:00:00Z".into(),
                        }),
                    }],
                })
                .collect(),
            rate_limits: Vec::new(),
            budgets: Vec::new(),
            effective_interval_secs: None,
        }
    }

    #[test]
    fn pages_escape_everything_remote() {
        let page = render_group(&view(3), "g", &[]).unwrap();
        assert!(page.contains("repo-1&lt;x&gt;"), "{page}");
        assert!(!page.contains("repo-1<x>"));
        assert!(render_group(&view(1), "nope", &[]).is_none());
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    /// `cargo test --release --lib dashboard::tests::render_time -- --nocapture` prints it.
    #[test]
    fn render_time_for_1000_repositories() {
        let v = view(1000);
        let start = std::time::Instant::now();
        let index = render_index(&v);
        let group = render_group(&v, "g", &[]).unwrap();
        let took = start.elapsed();
        println!(
            "index + group page for 1,000 repositories: {took:?} ({} bytes)",
            index.len() + group.len()
        );
        assert!(group.matches("<tr>").count() >= 1000);
        // Generous for debug builds on a loaded machine; the release figure is in the docs.
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }
}
