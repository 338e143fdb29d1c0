//! The shim's node-wide settings: which guest image a pod VM boots and
//! how big it is. They come from a small `key = value` file, by default
//! `/etc/chitin/shim.conf` (`CHITIN_SHIM_CONFIG` names another); a node
//! without one gets the defaults.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chitin::GuestImage;

/// Where the settings are read from when `CHITIN_SHIM_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "/etc/chitin/shim.conf";
/// Guest memory of a pod VM when the file does not say.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest file read: a settings file is a few lines.
const MAX_FILE: u64 = 64 << 10;

/// What a pod VM is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The guest image (`guest_dir`, holding `vmlinux` or `bzImage` and
    /// `initramfs.cpio`); without the key, [`GuestImage::default`].
    pub guest: GuestImage,
    /// Guest memory (`memory_mib`).
    pub memory_mib: u64,
    /// vCPUs (`vcpus`).
    pub vcpus: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            guest: GuestImage::default(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
        }
    }
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line is not a known `key = value`.
    #[error("{path}, line {line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

impl Config {
    /// The settings in force: the file `CHITIN_SHIM_CONFIG` names, else
    /// [`DEFAULT_PATH`] if it exists, else the defaults. A file named by
    /// the variable must exist.
    pub fn load() -> Result<Self, ConfigError> {
        match std::env::var_os("CHITIN_SHIM_CONFIG") {
            Some(path) => Self::from_file(Path::new(&path)),
            None if Path::new(DEFAULT_PATH).exists() => Self::from_file(Path::new(DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }

    /// The settings in `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_FILE {
            return Err(read(io::Error::other(format!(
                "{} bytes; a settings file is at most {MAX_FILE}",
                meta.len()
            ))));
        }
        let text = fs::read_to_string(path).map_err(read)?;
        Self::parse(&text).map_err(|(line, message)| ConfigError::Line {
            path: path.to_path_buf(),
            line,
            message,
        })
    }

    /// Parse the file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut config = Self::default();
        for (at, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |message: String| (at + 1, message);
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| fail(format!("expected `key = value`, found {line:?}")))?;
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                return Err(fail(format!("`{key}` has no value")));
            }
            match key {
                "guest_dir" => config.guest = GuestImage::in_dir(value),
                "memory_mib" => {
                    config.memory_mib = value
                        .parse()
                        .ok()
                        .filter(|m| *m > 0)
                        .ok_or_else(|| fail(format!("memory_mib: {value:?} is not a size")))?;
                }
                "vcpus" => {
                    config.vcpus = value
                        .parse()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| fail(format!("vcpus: {value:?} is not a count")))?;
                }
                other => {
                    return Err(fail(format!(
                        "unknown key `{other}` (known: guest_dir, memory_mib, vcpus)"
                    )))
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_comments_and_blank_lines() {
        let c =
            Config::parse("# node settings\n\nguest_dir = /opt/g\nmemory_mib=512\n vcpus = 2 \n")
                .unwrap();
        assert_eq!(c.guest, GuestImage::in_dir("/opt/g"));
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.vcpus, 2);
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn bad_lines_are_refused_by_line_number() {
        for (text, line, words) in [
            ("vcpus = 1\nmemory = 5\n", 2, "unknown key `memory`"),
            ("guest_dir\n", 1, "expected `key = value`"),
            ("memory_mib = 0\n", 1, "not a size"),
            ("memory_mib = lots\n", 1, "not a size"),
            ("vcpus = -1\n", 1, "not a count"),
            ("# x\nguest_dir =\n", 2, "has no value"),
        ] {
            let (at, message) = Config::parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}");
            assert!(message.contains(words), "{text:?}: {message}");
        }
    }

    #[test]
    fn a_named_file_must_exist_and_errors_name_it() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.conf");
        let err = Config::from_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.conf"), "{err}");
        let bad = dir.join("bad.conf");
        fs::write(&bad, "vcpus = 1\nwhat\n").unwrap();
        let err = Config::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.conf, line 2"), "{err}");
        let big = dir.join("big.conf");
        fs::write(&big, vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        assert!(Config::from_file(&big).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
