//! What the compiler expects from a C library: memcpy, memmove, memset, memcmp, bcmp. Written
//! with string instructions so the compiler cannot turn them back into calls to themselves.

use core::arch::asm;

/// # Safety
/// Standard `memcpy` contract: valid, non-overlapping ranges.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the ranges; rep movsb copies forward.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memmove` contract: valid ranges, possibly overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards (direction flag set for the copy, cleared after).
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

/// # Safety
/// Standard `memset` contract: a valid range.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memcmp` contract: valid ranges.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: within the caller's ranges.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// Standard `bcmp` contract: valid ranges.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The host target's prebuilt `core` is compiled for unwinding and names this symbol; the kit
/// aborts on panic, so it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
