//! The process's heap as glibc keeps it: at most two malloc arenas, and freed memory given
//! back to the kernel once enough of it piles up. By itself glibc returns only the top of
//! each heap; a burst of webhooks (connection buffers, request bodies, parsed events) frees
//! chunks below memory still in use, and those stay resident for good.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free heap is looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Free heap worth giving back: below it a trim would mostly find chunks smaller than a page.
pub const TRIM_OVER: usize = 1 << 20;

/// glibc gives each thread that allocates under contention an arena of its own, and keeps
/// what they grew: with the runtime's workers, the store's writer and libvirt's blocking
/// threads, a burst of webhooks leaves several MiB behind. The agent is I/O-bound; two
/// arenas cost it nothing measurable (`benches/ingest.rs`) and bound its memory. Call it
/// before any thread exists.
pub fn cap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Bytes in the heap's free chunks (glibc's `fordblks`); 0 with another allocator.
pub fn free_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    return unsafe { libc::mallinfo2() }.fordblks;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Gives the whole free pages of the heap back to the kernel (`malloc_trim(0)`); whether
/// any went back.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim releases free memory only; no allocation is touched.
    return unsafe { libc::malloc_trim(0) } == 1;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Every [`TRIM_EVERY`], trims the heap when [`TRIM_OVER`] or more of it is free, until
/// `shutdown`. The trim holds the arenas' locks for a moment: it runs on a blocking thread.
pub async fn keep_trimmed(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _ = tokio::task::spawn_blocking(|| free_bytes() >= TRIM_OVER && trim()).await;
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// Resident pages of `len` bytes from `start`, a page-aligned address (`mincore`).
    fn resident_pages(start: usize, len: usize) -> usize {
        let (from, to) = (start, start + len / PAGE * PAGE);
        let mut flags = vec![0u8; (to - from) / PAGE];
        // SAFETY: mincore only reports on the range; `flags` holds a byte per page of it.
        let r = unsafe { libc::mincore(from as *mut libc::c_void, to - from, flags.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        flags.iter().filter(|f| **f & 1 == 1).count()
    }

    /// Blocks freed below one still in use stay resident until a trim gives them back.
    #[test]
    fn freed_heap_below_live_memory_goes_back_to_the_kernel() {
        // The heap is the process's: another test's thread may use the same arena at the
        // same time (seen once in a full run). Three tries; every one must show the same.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match freed_then_trimmed() {
                Ok(()) => return,
                Err(e) => failures.push(e),
            }
        }
        panic!("{failures:?}");
    }

    fn freed_then_trimmed() -> Result<(), String> {
        // 16 KiB blocks (under glibc's mmap threshold, so they come from the heap), each
        // written; the last one stays, above the others.
        let mut blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8 | 1; 16 << 10]).collect();
        let keep = blocks.pop().expect("blocks");
        let start = blocks.iter().map(|b| b.as_ptr() as usize).min().expect("blocks");
        let end = blocks.iter().map(|b| b.as_ptr() as usize + b.len()).max().expect("blocks");
        // The whole pages between the first and the last block.
        let (start, end) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
        let len = end - start;
        let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
        check(len < 64 << 20, format!("the blocks are contiguous: {len} bytes apart"))?;
        let pages = len / PAGE;
        drop(blocks);
        check(resident_pages(start, len) > pages * 9 / 10, "freed but still resident".into())?;
        check(free_bytes() >= 8 << 20, format!("free bytes {}", free_bytes()))?;
        check(trim(), "trimmed".into())?;
        let left = resident_pages(start, len);
        check(left < pages / 10, format!("{left} of {pages} pages still resident after the trim"))?;
        drop(keep);
        Ok(())
    }
}
