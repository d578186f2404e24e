# The KVM probe guest: a 512-byte boot sector (GNU as syntax).  kvm_probe.py embeds its bytes; rebuild with
#   as --64 -o g.o probe-guest.S && ld -m elf_x86_64 -e 0x7c00 -Ttext 0x7c00 --oformat binary -o g.bin g.o
# then pad to 510 bytes and append 0x55 0xaa.
#
# Why this much: on some nested hosts KVM runs real-mode code fine, yet every guest page fault is so slow that
# a kernel stalls in its decompressor.  So the guest enters long mode, identity-maps 1 GiB with 2 MiB pages,
# enables SSE, and writes 1 GiB of memory (16 passes over 64 MiB) before it prints its marker on COM1 and
# leaves QEMU through isa-debug-exit (exit status (0x2a << 1) | 1 = 85).  Under TCG this takes about 0.5 s;
# under a working KVM a few milliseconds; under a broken one it does not finish within the probe timeout.
.code16
start:
  cli
  xor %ax,%ax
  mov %ax,%ds
  mov %ax,%es
  mov %ax,%ss
  mov $0x7c00,%sp
  mov $0x1000,%di              # page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD): clear them
  mov $0x1800,%cx
  cld
  rep stosw
  movw $0x2003,(0x1000)
  movw $0x3003,(0x2000)
  mov $0x3000,%di              # PD: 512 present, writable 2 MiB pages
  mov $0x83,%eax
  mov $512,%cx
fill_pd:
  mov %eax,(%di)
  add $0x200000,%eax
  add $8,%di
  loop fill_pd
  lgdtl gdtr
  mov %cr4,%eax
  or $0x620,%eax               # PAE, OSFXSR, OSXMMEXCPT
  mov %eax,%cr4
  mov $0x1000,%eax
  mov %eax,%cr3
  mov $0xc0000080,%ecx         # EFER.LME
  rdmsr
  or $0x100,%eax
  wrmsr
  mov %cr0,%eax
  or $0x80000001,%eax          # PG, PE
  mov %eax,%cr0
  ljmpl $0x08,$long64
.code64
long64:
  mov $0x10,%ax
  mov %ax,%ds
  mov %ax,%es
  movaps %xmm0,%xmm1           # SSE must work
  mov $16,%r8
pass:
  mov $0x1000000,%rdi          # 64 MiB from 16 MiB up
  mov $0x800000,%rcx
  mov %r8,%rax
  rep stosq
  dec %r8
  jnz pass
  mov $0x4fffff8,%rbx
  cmpq $1,(%rbx)
  jne hang
  mov $msg,%esi
  mov $0x3f8,%dx
print:
  lodsb
  test %al,%al
  jz done
  out %al,%dx
  jmp print
done:
  mov $0xf4,%dx
  mov $0x2a,%al
  out %al,%dx
hang:
  hlt
  jmp hang
.align 8
gdt:
  .quad 0
  .quad 0x00af9a000000ffff     # 64-bit code
  .quad 0x00cf92000000ffff     # data
gdtr:
  .word gdtr-gdt-1
  .long gdt
msg:
  .ascii "VIRTLET-KVM-PROBE-OK\r\n\0"
