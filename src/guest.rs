//! The default guest: the kernel and initramfs `cargo xtask guest` prepares,
//! whose PID 1 is chitin's agent.

use std::path::{Path, PathBuf};

/// Command line for guests that run the agent: console on COM1 (quiet),
/// reset through the i8042 on reboot, reboot at once on panic, and the
/// agent's exec service on.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet chitin.agent=1";

/// A guest kernel plus an initramfs whose /init is `chitin-agent`.
///
/// ```no_run
/// use chitin::{GuestImage, Sandbox};
///
/// let image = GuestImage::default();
/// let sandbox = Sandbox::builder().guest(image).build()?;
/// # Ok::<(), chitin::SandboxError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: PathBuf,
}

impl GuestImage {
    /// The image in `dir`: `dir/vmlinux` (or, where there is none,
    /// `dir/bzImage`: a distribution kernel as shipped) and
    /// `dir/initramfs.cpio`, the layout `cargo xtask guest` writes.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        let vmlinux = dir.join("vmlinux");
        let bzimage = dir.join("bzImage");
        let kernel = if !vmlinux.exists() && bzimage.exists() {
            bzimage
        } else {
            vmlinux
        };
        Self {
            kernel,
            initramfs: dir.join("initramfs.cpio"),
        }
    }

    /// An image from explicit files.
    pub fn new(kernel: impl Into<PathBuf>, initramfs: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: initramfs.into(),
        }
    }

    /// Where `cargo xtask guest` puts the image: `$CHITIN_GUEST_DIR` if
    /// set, else `guest/` under `$CHITIN_CACHE`, else under this source
    /// tree's `target/chitin-cache`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("CHITIN_GUEST_DIR") {
            return PathBuf::from(dir);
        }
        let cache = match std::env::var_os("CHITIN_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join("chitin-cache"),
        };
        cache.join("guest")
    }

    /// Whether both files exist (the image was prepared).
    pub fn exists(&self) -> bool {
        self.kernel.is_file() && self.initramfs.is_file()
    }

    /// The kernel.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The initramfs.
    pub fn initramfs(&self) -> &Path {
        &self.initramfs
    }
}

impl Default for GuestImage {
    /// The image in [`GuestImage::default_dir`].
    fn default() -> Self {
        Self::in_dir(Self::default_dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_dir_uses_xtask_file_names() {
        let image = GuestImage::in_dir("/cache/guest");
        assert_eq!(image.kernel(), Path::new("/cache/guest/vmlinux"));
        assert_eq!(image.initramfs(), Path::new("/cache/guest/initramfs.cpio"));
    }

    #[test]
    fn exists_is_false_for_missing_files() {
        assert!(!GuestImage::in_dir("/nonexistent").exists());
    }
}
