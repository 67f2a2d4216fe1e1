//! `O_DIRECT` I/O where the file system allows it: block-aligned buffers,
//! aligned reads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Block size and memory alignment of `O_DIRECT` writes.
pub(super) const DIRECT_ALIGN: usize = 4096;

/// Opens `path` with `options` plus `O_DIRECT` where the file system allows
/// it (tmpfs does not: then without); says which.
pub(super) fn open_direct(options: &OpenOptions, path: &Path) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut direct = options.clone();
    direct.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    match direct.open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
            Ok((options.open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Reads at least `need` bytes from the block-aligned `from` into `buf`
/// (whole blocks, as `O_DIRECT` wants; the file may end sooner, after `need`).
pub(super) fn read_aligned(
    file: &File,
    buf: &mut AlignedBuf,
    from: u64,
    need: usize,
) -> std::io::Result<()> {
    let window = buf.window();
    let len = need.next_multiple_of(DIRECT_ALIGN);
    let mut got = 0;
    while got < need {
        match file.read_at(&mut window[got..len], from + got as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Memory for `O_DIRECT` I/O: a block-aligned window of a vector (safe
/// code cannot ask the allocator for an alignment).
pub(super) struct AlignedBuf {
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) len: usize,
}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { buf, start, len }
    }

    pub(super) fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}
