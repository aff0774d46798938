/* A tiny PVH test guest for the real-CH tests: Cloud Hypervisor finds the entry point in the
 * XEN_ELFNOTE_PHYS32_ENTRY note (type 18) and starts it in 32-bit protected mode, paging off.
 * It writes a marker to COM1 (port 0x3f8) and halts forever. No PVM- or CPU-specific code, so it
 * runs under PVM as well as under hardware KVM. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start
        .balign 4

        .text
        .code32
        .globl _start
_start:
        cli
        mov $0x3f8, %dx
        mov $marker, %esi
1:      lodsb
        test %al, %al
        jz 2f
        out %al, %dx
        jmp 1b
2:      hlt
        jmp 2b

marker: .asciz "CAPSULES-PVH-GUEST-OK\n"
