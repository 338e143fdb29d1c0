//! Result lines on the console: written by [`Report`], read back by
//! [`CheckLine::parse`] and [`Done::parse`].
//!
//! ```text
//! chitin-check: <name> PASS <detail>
//! chitin-check: <name> FAIL <detail>
//! chitin-agent: done pass=<n> fail=<m>
//! ```
//!
//! The parsers are strict because the text comes from a guest under test:
//! a line that merely contains ` fail=0` or ` PASS` is not a result.

use std::io::Write;

/// The first line a test agent (or host check run) prints:
/// `chitin-agent: up version=<protocol version> scenario=<name>`.
pub const UP_MARKER: &str = "chitin-agent: up";
/// What starts a check line.
pub const CHECK_PREFIX: &str = "chitin-check: ";
/// What starts the summary line.
pub const DONE_PREFIX: &str = "chitin-agent: done ";

/// Writes result lines to stdout and counts them.
#[derive(Debug, Default)]
pub struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    /// A report with no results yet.
    pub fn new() -> Self {
        Self::default()
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
        let line = CheckLine {
            name: name.to_string(),
            passed: ok,
            detail: detail.to_string(),
        };
        self.line(&line.to_string());
    }

    /// Record a check from its result: `Ok(detail)` passes, `Err(detail)`
    /// fails.
    pub fn result(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => self.check(name, true, &detail),
            Err(detail) => self.check(name, false, &detail),
        }
    }

    /// Print the summary line.
    pub fn done(&mut self) {
        let done = Done {
            pass: self.passed,
            fail: self.failed,
        };
        self.line(&done.to_string());
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

/// One `chitin-check:` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    /// The check's name (no spaces).
    pub name: String,
    /// PASS or FAIL.
    pub passed: bool,
    /// What it measured or why it failed (may be empty).
    pub detail: String,
}

impl CheckLine {
    /// Parse a whole console line; `None` unless it is exactly a check
    /// line: the prefix at its start, a name, then `PASS` or `FAIL`.
    pub fn parse(line: &str) -> Option<CheckLine> {
        let rest = line.trim_end().strip_prefix(CHECK_PREFIX)?;
        let (name, rest) = rest.split_once(' ')?;
        let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        let passed = match verdict {
            "PASS" => true,
            "FAIL" => false,
            _ => return None,
        };
        (!name.is_empty()).then(|| CheckLine {
            name: name.to_string(),
            passed,
            detail: detail.to_string(),
        })
    }
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{CHECK_PREFIX}{} {verdict} {}", self.name, self.detail)
    }
}

/// The `chitin-agent: done` summary line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Checks passed.
    pub pass: u32,
    /// Checks failed.
    pub fail: u32,
}

impl Done {
    /// Parse a whole console line; `None` unless it is exactly
    /// `chitin-agent: done pass=<n> fail=<m>`.
    pub fn parse(line: &str) -> Option<Done> {
        let rest = line.trim_end().strip_prefix(DONE_PREFIX)?;
        let mut fields = rest.split(' ');
        let pass = fields.next()?.strip_prefix("pass=")?.parse().ok()?;
        let fail = fields.next()?.strip_prefix("fail=")?.parse().ok()?;
        fields.next().is_none().then_some(Done { pass, fail })
    }

    /// Whether this summary vouches for `checks`, the check lines seen:
    /// at least one check, none failed, and as many passes as PASS lines,
    /// give or take the `garbled` lines that started as check lines but no
    /// longer parse (a kernel message can cut into a console line).
    pub fn vouches_for(&self, checks: &[CheckLine], garbled: usize) -> Result<(), String> {
        let passed = checks.iter().filter(|c| c.passed).count();
        let failed = checks.len() - passed;
        if self.fail != 0 || failed != 0 {
            return Err(format!("{} checks failed ({failed} FAIL lines)", self.fail));
        }
        if self.pass == 0 || passed == 0 {
            return Err("the summary says no check passed".into());
        }
        let claimed = self.pass as usize;
        if claimed < passed || claimed > passed + garbled {
            return Err(format!(
                "the summary says {claimed} passed, but {passed} PASS lines were seen \
                 ({garbled} garbled)"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{DONE_PREFIX}pass={} fail={}", self.pass, self.fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_lines_round_trip() {
        for (name, passed, detail) in [("echo", true, "hello world"), ("x", false, "")] {
            let line = CheckLine {
                name: name.into(),
                passed,
                detail: detail.into(),
            };
            assert_eq!(CheckLine::parse(&line.to_string()), Some(line));
        }
    }

    #[test]
    fn check_parse_rejects_lines_that_only_look_like_one() {
        for bad in [
            "echo PASS hello",
            "x chitin-check: echo PASS hello",
            "chitin-check: echo PASSED hello",
            "chitin-check: echo",
            "chitin-check:  PASS x",
            "chitin-check: echo fail=0",
        ] {
            assert_eq!(CheckLine::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn done_parses_only_the_exact_summary() {
        assert_eq!(
            Done::parse("chitin-agent: done pass=3 fail=0"),
            Some(Done { pass: 3, fail: 0 })
        );
        for bad in [
            "chitin-check: echo PASS fail=0",
            "xx chitin-agent: done pass=3 fail=0",
            "chitin-agent: done pass=3 fail=0 extra",
            "chitin-agent: done pass=3",
            "chitin-agent: done fail=0 pass=3",
            "chitin-agent: done pass=-1 fail=0",
        ] {
            assert_eq!(Done::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn done_vouches_only_for_what_was_seen() {
        let pass = |n: &str| CheckLine::parse(&format!("chitin-check: {n} PASS ok")).unwrap();
        let fail = CheckLine::parse("chitin-check: b FAIL no").unwrap();
        let two = [pass("a"), pass("c")];
        assert!(Done { pass: 2, fail: 0 }.vouches_for(&two, 0).is_ok());
        // pass=0 vouches for nothing, even with fail=0.
        assert!(Done { pass: 0, fail: 0 }.vouches_for(&[], 0).is_err());
        assert!(Done { pass: 1, fail: 0 }.vouches_for(&[], 1).is_err());
        // A count that disagrees with the lines seen.
        assert!(Done { pass: 3, fail: 0 }.vouches_for(&two, 0).is_err());
        assert!(Done { pass: 1, fail: 0 }.vouches_for(&two, 0).is_err());
        // ... unless a check line was cut into: one more, no more.
        assert!(Done { pass: 3, fail: 0 }.vouches_for(&two, 1).is_ok());
        assert!(Done { pass: 4, fail: 0 }.vouches_for(&two, 1).is_err());
        // A FAIL line, whatever the summary says.
        assert!(Done { pass: 2, fail: 0 }
            .vouches_for(&[pass("a"), fail.clone()], 0)
            .is_err());
        assert!(Done { pass: 2, fail: 1 }.vouches_for(&two, 0).is_err());
    }
}
