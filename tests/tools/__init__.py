"""Integration tests of the external tool wrappers (qemu-img, nbdkit) against the real tools."""
