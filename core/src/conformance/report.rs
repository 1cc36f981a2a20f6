//! The suite's result: one row per case, a table printer and a JSON writer (hand-written, to keep sd3-core free
//! of serialisation dependencies).

use std::fmt::Write as _;
use std::io::Write;

/// Why a case failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The device returned an error (from alloc, upload, execute, synchronize or download).
    Error(String),
    /// The device panicked.
    Panic(String),
    /// The device wrote outside its output view: `count` bytes changed, the first at byte `first`.
    Sentinel { count: usize, first: usize, buffer_bytes: usize },
    /// The device changed the bytes of input `index`.
    InputModified { index: usize, count: usize, first: usize },
    /// NaN in the output at this logical element.
    NaN { element: usize },
    /// An infinity where the reference has none, or of the wrong sign.
    InfMismatch { element: usize, expected: f64, found: f64 },
    /// Normalised mean squared error above the limit.
    Nmse { nmse: f64, limit: f64 },
    /// The case itself is wrong (the reference rejects it or produces NaN): a bug in the suite.
    Suite(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(m) => write!(f, "error: {m}"),
            Failure::Panic(m) => write!(f, "panic: {m}"),
            Failure::Sentinel { count, first, buffer_bytes } => write!(
                f,
                "wrote outside its output: {count} sentinel byte(s) changed, first at byte {first} of the \
                 {buffer_bytes}-byte buffer"
            ),
            Failure::InputModified { index, count, first } => {
                write!(f, "modified input #{index}: {count} byte(s) changed, first at byte {first}")
            }
            Failure::NaN { element } => write!(f, "NaN at output element {element}"),
            Failure::InfMismatch { element, expected, found } => {
                write!(f, "output element {element} is {found}, reference {expected}")
            }
            Failure::Nmse { nmse, limit } => write!(f, "nmse {nmse:.3e} > limit {limit:.1e}"),
            Failure::Suite(m) => write!(f, "suite error: {m}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Pass,
    Fail(Failure),
    /// The device's `supports` declined the call: not a failure (the host falls back to the CPU).
    Unsupported,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail(_) => "FAIL",
            Status::Unsupported => "unsupported",
        }
    }
}

/// Timing of one case in `--perf` mode.
#[derive(Clone, Debug, PartialEq)]
pub struct PerfResult {
    /// Median over `runs` timed executions (each `execute` + `synchronize`), after one warm-up.
    pub median_us: f64,
    pub runs: usize,
    /// Floating-point operations of one execution (multiply-add = 2), when the op is compute-bound.
    pub flops: Option<f64>,
    /// Bytes read and written by one execution (each operand's logical elements once).
    pub bytes: f64,
}

impl PerfResult {
    pub fn tflops(&self) -> Option<f64> {
        self.flops.map(|f| f / (self.median_us * 1e-6) / 1e12)
    }
    pub fn gbps(&self) -> f64 {
        self.bytes / (self.median_us * 1e-6) / 1e9
    }
}

#[derive(Clone, Debug)]
pub struct CaseResult {
    pub op: String,
    pub dtype: String,
    pub shape: String,
    pub status: Status,
    /// NMSE against the reference (test mode, when the values were compared).
    pub nmse: Option<f64>,
    pub limit: f64,
    /// Time of the device's `execute` + `synchronize` for this case (test mode: one run).
    pub time_us: Option<f64>,
    pub perf: Option<PerfResult>,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The device's name, as it reports it.
    pub device: String,
    pub perf_mode: bool,
    /// The base seed the inputs were generated from (`Options::seed`).
    pub seed: u64,
    pub results: Vec<CaseResult>,
}

impl Report {
    pub fn count(&self, label: &str) -> usize {
        self.results.iter().filter(|r| r.status.label() == label).count()
    }
    pub fn passed(&self) -> usize {
        self.count("pass")
    }
    pub fn failed(&self) -> usize {
        self.count("FAIL")
    }
    pub fn unsupported(&self) -> usize {
        self.count("unsupported")
    }
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.results.iter().filter(|r| matches!(r.status, Status::Fail(_)))
    }
    pub fn all_passed(&self) -> bool {
        self.failed() == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {} passed, {} failed, {} unsupported, of {} cases",
            self.device,
            self.passed(),
            self.failed(),
            self.unsupported(),
            self.results.len()
        )
    }

    /// A human table, one case a line, the failure reason at the end of failing lines.
    pub fn write_table(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let shape_w = self.results.iter().map(|r| r.shape.chars().count()).max().unwrap_or(5).clamp(5, 70);
        let dtype_w = self.results.iter().map(|r| r.dtype.chars().count()).max().unwrap_or(5).max(5);
        if self.perf_mode {
            writeln!(
                w,
                "{:<22} {:<dtype_w$} {:<shape_w$} {:<11} {:>12} {:>5} {:>9} {:>9}",
                "op", "dtype", "shape", "status", "µs/run", "runs", "TFLOP/s", "GB/s"
            )?;
        } else {
            writeln!(
                w,
                "{:<22} {:<dtype_w$} {:<shape_w$} {:<11} {:>10} {:>8} {:>10}",
                "op", "dtype", "shape", "status", "nmse", "limit", "µs"
            )?;
        }
        for r in &self.results {
            let shape = pad(&r.shape, shape_w);
            let dtype = pad(&r.dtype, dtype_w);
            let mut line = if let (true, Some(p)) = (self.perf_mode, &r.perf) {
                let tf = p.tflops().map(|t| format!("{t:.4}")).unwrap_or_default();
                format!(
                    "{:<22} {dtype} {shape} {:<11} {:>12.1} {:>5} {:>9} {:>9.2}",
                    r.op,
                    r.status.label(),
                    p.median_us,
                    p.runs,
                    tf,
                    p.gbps()
                )
            } else {
                let nmse = r.nmse.map(|e| format!("{e:.2e}")).unwrap_or_default();
                let time = r.time_us.map(|t| format!("{t:.0}")).unwrap_or_default();
                format!(
                    "{:<22} {dtype} {shape} {:<11} {:>10} {:>8.1e} {:>10}",
                    r.op,
                    r.status.label(),
                    nmse,
                    r.limit,
                    time
                )
            };
            if let Status::Fail(f) = &r.status {
                let _ = write!(line, "  {f}");
            }
            writeln!(w, "{}", line.trim_end())?;
        }
        writeln!(w, "{}", self.summary())
    }

    /// One line per op, one column per dtype group: `passed/total`, then `nF` failed and `nU` unsupported.
    /// Groups: `f32`, `f16`, `bf16` (integer ids aside, every operand of that dtype), `mixed` (several float
    /// dtypes or float and integer data: casts, f16-weight matmuls), `int` (integer-only copies).
    pub fn write_op_summary(&self, w: &mut dyn Write) -> std::io::Result<()> {
        const GROUPS: [&str; 5] = ["f32", "f16", "bf16", "mixed", "int"];
        let mut ops: Vec<&str> = Vec::new();
        for r in &self.results {
            if !ops.contains(&r.op.as_str()) {
                ops.push(&r.op);
            }
        }
        writeln!(w, "{:<22} {}", "op", GROUPS.map(|g| format!("{g:<12}")).join(" ").trim_end())?;
        for op in ops {
            let cells = GROUPS.map(|g| {
                let rows: Vec<&CaseResult> =
                    self.results.iter().filter(|r| r.op == op && dtype_group(&r.dtype) == g).collect();
                let count = |label: &str| rows.iter().filter(|r| r.status.label() == label).count();
                let mut cell =
                    if rows.is_empty() { "-".to_string() } else { format!("{}/{}", count("pass"), rows.len()) };
                for (label, tag) in [("FAIL", "F"), ("unsupported", "U")] {
                    if count(label) > 0 {
                        let _ = write!(cell, " {}{tag}", count(label));
                    }
                }
                format!("{cell:<12}")
            });
            writeln!(w, "{:<22} {}", op, cells.join(" ").trim_end())?;
        }
        Ok(())
    }

    /// The report as a JSON object: `{"device", "mode", "seed", "summary": {...}, "cases": [{...}]}`.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\n  \"device\": {},\n  \"mode\": \"{}\",\n  \"seed\": {},\n  \"summary\": {{\"passed\": {}, \"failed\": {}, \"unsupported\": {}, \"total\": {}}},\n  \"cases\": [",
            json_str(&self.device),
            if self.perf_mode { "perf" } else { "test" },
            self.seed,
            self.passed(),
            self.failed(),
            self.unsupported(),
            self.results.len()
        );
        for (i, r) in self.results.iter().enumerate() {
            let reason = match &r.status {
                Status::Fail(f) => json_str(&f.to_string()),
                _ => "null".into(),
            };
            let _ = write!(
                s,
                "{}\n    {{\"op\": {}, \"dtype\": {}, \"shape\": {}, \"status\": \"{}\", \"reason\": {}, \"nmse\": {}, \"limit\": {}, \"time_us\": {}",
                if i == 0 { "" } else { "," },
                json_str(&r.op),
                json_str(&r.dtype),
                json_str(&r.shape),
                r.status.label().to_ascii_lowercase(),
                reason,
                json_num(r.nmse),
                json_num(Some(r.limit)),
                json_num(r.time_us)
            );
            if let Some(p) = &r.perf {
                let _ = write!(
                    s,
                    ", \"perf\": {{\"median_us\": {}, \"runs\": {}, \"flops\": {}, \"bytes\": {}, \"tflops\": {}, \"gbps\": {}}}",
                    json_num(Some(p.median_us)),
                    p.runs,
                    json_num(p.flops),
                    json_num(Some(p.bytes)),
                    json_num(p.tflops()),
                    json_num(Some(p.gbps()))
                );
            }
            s.push('}');
        }
        s.push_str("\n  ]\n}\n");
        s
    }
}

/// The summary column of a case's dtype label (see [`Report::write_op_summary`]).
fn dtype_group(label: &str) -> &str {
    let Some((ins, out)) = label.split_once('→') else {
        return if matches!(label, "f32" | "f16" | "bf16") { label } else { "int" };
    };
    let mut floats = ins.split(',').filter(|d| matches!(*d, "f32" | "f16" | "bf16")).peekable();
    if floats.peek().is_some() && floats.all(|d| d == out) {
        out
    } else {
        "mixed"
    }
}

fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n >= width {
        s.to_string()
    } else {
        format!("{s}{}", " ".repeat(width - n))
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number, or `null` for none and for non-finite values (JSON has no NaN or Infinity).
fn json_num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:e}"),
        _ => "null".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}→"), "\"a\\\"b\\\\c\\n\\u0001→\"");
    }

    #[test]
    fn dtype_groups() {
        let cases = [("f16", "f16"), ("u8", "int"), ("bf16,i64→bf16", "bf16"), ("f32,f16→f32", "mixed")];
        for (label, group) in cases.into_iter().chain([("f32→f16", "mixed"), ("i32→f32", "mixed")]) {
            assert_eq!(dtype_group(label), group, "{label}");
        }
    }

    #[test]
    fn json_numbers_are_valid() {
        assert_eq!(json_num(Some(5e-4)), "5e-4");
        assert_eq!(json_num(Some(f64::INFINITY)), "null");
        assert_eq!(json_num(None), "null");
    }
}
