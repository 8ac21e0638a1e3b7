"""Everything that speaks to the kernel: bcc programs and maps, raw bpf(2) calls, sockets."""
