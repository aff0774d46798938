//! Guest assets built from Debian packages: kernel, initramfs, base root filesystems.
