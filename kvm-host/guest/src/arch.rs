//! x86-64 plumbing: entry point, per-CPU stacks, IDT and interrupt stubs, port I/O, MSRs, CPUID.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// Most VPs the guest gives a stack to.
pub const MAX_CPUS: u64 = 8;
const STACK_SIZE: u64 = 16 * 1024;
/// Vector the guest programs into SINT2.
pub const SINT_VECTOR: u8 = 0x50;
/// Port that stops the partition with a status byte.
pub const EXIT_PORT: u16 = 0x4857;
const LAPIC: u64 = 0xFEE0_0000;

#[repr(C, align(4096))]
struct Stacks(UnsafeCell<[u8; (MAX_CPUS * STACK_SIZE) as usize]>);
// SAFETY: each CPU uses only its own slice, through the stack pointer.
unsafe impl Sync for Stacks {}
#[unsafe(no_mangle)]
static STACKS: Stacks = Stacks(UnsafeCell::new([0; (MAX_CPUS * STACK_SIZE) as usize]));

/// Counters the interrupt stubs bump.
#[unsafe(no_mangle)]
pub static BP_COUNT: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
pub static GP_COUNT: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
pub static SINT_COUNT: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
pub static OTHER_IRQ_COUNT: AtomicU64 = AtomicU64::new(0);

// Entry: RDI = VP index, RSI = zero page, RDX = VP count, RCX = mode (set by kvm-host).
global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
_start:
    cli
    cld
    cmp rdi, {max}
    jae 9f
    lea rsp, [rip + STACKS]
    mov rax, rdi
    inc rax
    imul rax, rax, {stack}
    add rsp, rax
    xor ebp, ebp
    call {main}
9:  cli
    hlt
    jmp 9b
    "#,
    max = const MAX_CPUS,
    stack = const STACK_SIZE,
    main = sym crate::guest_main,
);

// Interrupt stubs. #BP counts and returns (a trap: RIP is after INT3). #GP is expected only from
// RDMSR/WRMSR in the MSR tests: skip the 2-byte instruction and count; any other #GP is fatal.
// The SINT vector counts and writes the LAPIC EOI. Other exceptions are fatal; other external
// interrupts are counted and EOI'd.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .global isr_bp
isr_bp:
    lock inc qword ptr [rip + BP_COUNT]
    iretq

    .global isr_gp
isr_gp:
    push rax
    mov rax, [rsp + 16]
    cmp byte ptr [rax], 0x0f
    jne 2f
    cmp byte ptr [rax + 1], 0x30
    je 1f
    cmp byte ptr [rax + 1], 0x32
    jne 2f
1:  add qword ptr [rsp + 16], 2
    lock inc qword ptr [rip + GP_COUNT]
    pop rax
    add rsp, 8
    iretq
2:  pop rax
    push 13
    jmp exc_common

    .global isr_sint
isr_sint:
    push rax
    lock inc qword ptr [rip + SINT_COUNT]
    mov eax, {eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq

    .global isr_other
isr_other:
    push rax
    lock inc qword ptr [rip + OTHER_IRQ_COUNT]
    mov eax, {eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq

    .global isr_spurious
isr_spurious:
    iretq

    .altmacro
    .macro EXC_NOERR n
    exc_\n:
        push 0
        push \n
        jmp exc_common
    .endm
    .macro EXC_ERR n
    exc_\n:
        push \n
        jmp exc_common
    .endm
    .irp n, 0,1,2,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        EXC_NOERR \n
    .endr
    .irp n, 8,10,11,12,14,17,21,29,30
        EXC_ERR \n
    .endr

exc_common:
    mov rdi, [rsp]
    mov rdx, [rsp + 8]
    mov rsi, [rsp + 16]
    and rsp, -16
    call {fatal}
3:  hlt
    jmp 3b

    .section .rodata.exc_table, "a"
    .balign 8
    .global EXC_TABLE
EXC_TABLE:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .ifc \n,3
        .quad isr_bp
        .else
        .ifc \n,13
        .quad isr_gp
        .else
        .quad exc_\n
        .endif
        .endif
    .endr
    "#,
    eoi = const LAPIC + 0xB0,
    fatal = sym crate::fatal_exception,
);

unsafe extern "C" {
    static EXC_TABLE: [u64; 32];
    fn isr_sint();
    fn isr_other();
    fn isr_spurious();
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);
// SAFETY: written once by the BSP before interrupts are enabled, then only read by the CPU.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

fn gate(handler: u64) -> [u64; 2] {
    // Interrupt gate, present, DPL 0, selector 0x10 (the boot GDT's code segment).
    let low =
        (handler & 0xFFFF) | (0x10 << 16) | (0x8E00u64 << 32) | ((handler >> 16) & 0xFFFF) << 48;
    [low, handler >> 32]
}

/// Builds the IDT (once, on the BSP).
pub fn init_idt() {
    // SAFETY: only the BSP calls this, before any CPU loads the IDT or enables interrupts.
    let idt = unsafe { &mut *IDT.0.get() };
    // SAFETY: EXC_TABLE is an immutable table of 32 code addresses defined in the asm above.
    let exc = unsafe { &*core::ptr::addr_of!(EXC_TABLE) };
    for (v, entry) in idt.iter_mut().enumerate() {
        let handler = match v {
            0..32 => exc[v],
            0x50 => isr_sint as *const () as u64,
            0xFF => isr_spurious as *const () as u64,
            _ => isr_other as *const () as u64,
        };
        *entry = gate(handler);
    }
}

/// Loads the IDT on this CPU.
pub fn load_idt() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is static and fully initialised.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) };
}

/// Loads an empty IDT (limit 0): the next exception triple-faults.
pub fn load_null_idt() {
    let p: [u16; 5] = [0; 5];
    // SAFETY: deliberately breaks exception delivery; used only by the triple-fault scenario.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) };
}

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR; a #GP is caught by isr_gp, which skips the instruction (EDX:EAX
    // then hold whatever they held: callers compare GP_COUNT).
    unsafe {
        asm!("xor eax, eax", "xor edx, edx", "rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writing a synthetic MSR (or provoking #GP, caught by isr_gp).
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
}

/// Runs `f` and reports whether it raised exactly one #GP.
pub fn gp(f: impl FnOnce()) -> bool {
    let before = GP_COUNT.load(Ordering::SeqCst);
    f();
    GP_COUNT.load(Ordering::SeqCst) == before + 1
}

pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: identity-mapped device (or unbacked) address; a volatile 32-bit load.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) };
}

/// Software-enables the local APIC (spurious vector 0xFF).
pub fn enable_lapic() {
    mmio_write32(LAPIC + 0xF0, 0x1FF);
}

/// Enables interrupts and halts until the SINT counter moves past `seen`. No timeout: if the
/// interrupt never comes, the host's run timeout ends the test (the transcript shows the step).
pub fn wait_sint(seen: u64) -> u64 {
    loop {
        let now = SINT_COUNT.load(Ordering::SeqCst);
        if now > seen {
            // SAFETY: back to the interrupts-off state the guest runs in.
            unsafe { asm!("cli", options(nomem, nostack)) };
            return now;
        }
        // SAFETY: STI's one-instruction shadow makes "sti; hlt" race-free.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Halts this CPU forever.
pub fn halt() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing to preserve.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Stops the partition with `status`.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    halt()
}
