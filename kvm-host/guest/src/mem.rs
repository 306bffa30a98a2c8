//! The guest's heap (a static arena under `linked_list_allocator`) and DMA pages: memory is
//! identity-mapped, so a page's address is its GPA.

use core::alloc::Layout;
use core::cell::UnsafeCell;

use linked_list_allocator::LockedHeap;

const HEAP_SIZE: usize = 2 << 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);
// SAFETY: handed to the allocator once, which serialises all access with its lock.
unsafe impl Sync for Arena {}
static ARENA: Arena = Arena(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the arena to the allocator (once, on the BSP, before anything allocates).
pub fn init() {
    // SAFETY: the arena is a static used by nothing else, initialised exactly once.
    unsafe { HEAP.lock().init(ARENA.0.get().cast::<u8>(), HEAP_SIZE) };
}

/// Bytes in use on the heap.
pub fn used() -> usize {
    HEAP.lock().used()
}

/// `n` contiguous, page-aligned pages that live for the rest of the run. Returns the GPA of the
/// first; `None` when the heap is exhausted.
pub fn pages(n: usize) -> Option<u64> {
    let layout = Layout::from_size_align(n.checked_mul(4096)?, 4096).ok()?;
    // A zero-size layout (n = 0) must not reach the allocator.
    if layout.size() == 0 {
        return None;
    }
    // SAFETY: non-zero size (checked above).
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    (!p.is_null()).then_some(p as u64)
}

/// Copies `bytes` to guest-physical (= virtual) address `gpa`.
pub fn write(gpa: u64, bytes: &[u8]) {
    // SAFETY: callers pass addresses of pages from `pages` with room for `bytes`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), gpa as *mut u8, bytes.len()) };
}

/// Copies from `gpa` into `out`.
pub fn read(gpa: u64, out: &mut [u8]) {
    // SAFETY: callers pass addresses of pages from `pages` holding `out.len()` bytes.
    unsafe { core::ptr::copy_nonoverlapping(gpa as *const u8, out.as_mut_ptr(), out.len()) };
}
