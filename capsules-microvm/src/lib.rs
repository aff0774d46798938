//! Host-side microVM plumbing every VMM shares: guest assets (kernel, initramfs, rootfs images), the
//! guest-agent client, tap networking with nftables and the DNS forwarder, data disks — and a generic
//! capsules `Backend` over a small [`vmm::Vmm`] trait.

pub mod assets;
pub mod backend;
pub mod net;
pub mod testing;
pub mod vmm;
