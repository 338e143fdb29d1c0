//! Result lines on the console, counted.

use std::io::Write;

/// Writes protocol lines and counts check results.
pub struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    /// A report with no results yet.
    pub fn new() -> Self {
        Self {
            passed: 0,
            failed: 0,
        }
    }

    /// Print one line and flush it, so it reaches the console even if the
    /// VM stops right after.
    pub fn line(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// Record and print one check result.
    pub fn check(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        let verdict = if ok { "PASS" } else { "FAIL" };
        self.line(&format!("chitin-check: {name} {verdict} {detail}"));
    }

    /// Checks that passed.
    pub fn passed(&self) -> u32 {
        self.passed
    }

    /// Checks that failed.
    pub fn failed(&self) -> u32 {
        self.failed
    }
}
