//! The kernel command line as `key=value` pairs, read from /proc/cmdline.

/// Parsed kernel command line.
pub struct KernelCmdline {
    raw: String,
}

impl KernelCmdline {
    /// Read /proc/cmdline; empty if it cannot be read.
    pub fn read() -> Self {
        let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Self::parse(raw.trim())
    }

    /// Wrap a command line string.
    pub fn parse(raw: &str) -> Self {
        Self {
            raw: raw.to_string(),
        }
    }

    /// The whole line.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The value of the last `key=value` entry for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.raw
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .next_back()
    }

    /// The values of every `key=value` entry for `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.raw
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(move |(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The value of `key` parsed as a number.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_returns_last_value_for_key() {
        let c = KernelCmdline::parse("a=1 chitin.scenario=boot quiet chitin.scenario=smp4");
        assert_eq!(c.get("chitin.scenario"), Some("smp4"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("missing"), None);
    }

    #[test]
    fn get_all_returns_every_value_in_order() {
        let c = KernelCmdline::parse("chitin.net=a x=1 chitin.net=b");
        assert_eq!(c.get_all("chitin.net").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.get_all("y").count(), 0);
    }

    #[test]
    fn get_u64_rejects_non_numbers() {
        let c = KernelCmdline::parse("n=12 m=x");
        assert_eq!(c.get_u64("n"), Some(12));
        assert_eq!(c.get_u64("m"), None);
    }
}
