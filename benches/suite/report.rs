//! The suite's output: a Markdown table of headline numbers with their targets, extra
//! Markdown sections (the growth table), and `target/bench/results.json` with everything.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};

/// One headline number.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub benchmark: &'static str,
    pub metric: String,
    pub result: String,
    /// `None` for numbers that are reported, not judged.
    pub target: Option<String>,
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Markdown sections printed after the main table.
    pub sections: Vec<String>,
    /// Per-benchmark details for the JSON file.
    pub details: serde_json::Map<String, Value>,
}

impl Report {
    /// A judged number.
    pub fn judged(
        &mut self,
        benchmark: &'static str,
        metric: impl Into<String>,
        result: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) {
        self.rows.push(Row {
            benchmark,
            metric: metric.into(),
            result: result.into(),
            target: Some(target.into()),
            met: Some(met),
        });
    }

    /// A number reported for context.
    pub fn info(
        &mut self,
        benchmark: &'static str,
        metric: impl Into<String>,
        result: impl Into<String>,
    ) {
        self.rows.push(Row {
            benchmark,
            metric: metric.into(),
            result: result.into(),
            target: None,
            met: None,
        });
    }

    pub fn detail(&mut self, benchmark: &str, value: Value) {
        self.details.insert(benchmark.to_owned(), value);
    }

    /// A benchmark that could not run: a failed row, and the error in the details.
    pub fn failed(&mut self, benchmark: &'static str, error: &anyhow::Error) {
        self.rows.push(Row {
            benchmark,
            metric: "run".into(),
            result: format!("FAILED: {}", first_line(&format!("{error:#}"))),
            target: Some("completes".into()),
            met: Some(false),
        });
        self.detail(benchmark, json!({ "error": format!("{error:#}") }));
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        md.push_str("| benchmark | metric | result | target | met |\n");
        md.push_str("|---|---|---|---|---|\n");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {met} |",
                r.benchmark,
                r.metric,
                r.result,
                r.target.as_deref().unwrap_or("")
            );
        }
        for section in &self.sections {
            md.push('\n');
            md.push_str(section);
        }
        md
    }

    /// Writes `results.json` into `dir`; returns its path.
    pub fn write_json(&self, dir: &Path, header: Value) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("results.json");
        let mut doc = header;
        if let Value::Object(map) = &mut doc {
            map.insert("rows".into(), serde_json::to_value(&self.rows)?);
            map.insert("details".into(), Value::Object(self.details.clone()));
            map.insert("markdown".into(), Value::String(self.markdown()));
        }
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        Ok(path)
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// `1234.5` → `1,235`; small numbers keep one decimal.
pub fn num(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    if value.abs() < 100.0 {
        return format!("{value:.1}");
    }
    let whole = value.round() as i64;
    let digits = whole.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if whole < 0 { format!("-{out}") } else { out }
}

/// The machine the numbers came from.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim())
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel.trim(),
        "git": crate::support::git(Path::new("."), &["--version"]).unwrap_or_default(),
    })
}
