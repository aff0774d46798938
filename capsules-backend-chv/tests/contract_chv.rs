//! The backend contract suite (`capsules_core::testkit::backend`) against real Cloud Hypervisor
//! microVMs — the production VMM on hardware-KVM hosts.
//!
//! Run on such a host with one variable (plus root for taps and nftables):
//!
//! ```sh
//! CAPSULES_CH_BIN=/usr/local/bin/cloud-hypervisor cargo test -p capsules-backend-chv --test contract_chv -- --test-threads=1
//! ```
//!
//! Where the host cannot run the Debian guest under CH (no `/dev/kvm`, or PVM as on our development
//! machines) every case is reported as ignored with the host check's reason, and
//! `pvm_host_fails_fast` checks that building the backend there fails in under a second with an
//! error that explains why and names the QEMU backend. The process moves into a network namespace
//! of its own first, so taps, nftables and the DNS forwarder never touch the machine's network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsules_backend_chv::ChvBuilder;
use capsules_core::Backend;
use capsules_core::testkit::backend::{Runner, SpawnEchoServer, cases};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::MicroVmBackend;
use capsules_microvm::net::{NetConfig, Network};
use capsules_microvm::testing::{PERL_TCP_ECHO_ARGV, check_prerequisites, on_path};
use capsules_microvm::vmm::{Vmm, VmmError};
use libtest_mimic::{Arguments, Failed, Trial};

fn prerequisites() -> Result<(), String> {
    if std::env::var_os("CAPSULES_CH_BIN").is_none() && !on_path("cloud-hypervisor") {
        return Err("Cloud Hypervisor not found: set CAPSULES_CH_BIN or put cloud-hypervisor on PATH".into());
    }
    check_prerequisites(&[("nft", "nftables"), ("ip", "iproute2")])
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let ignore_all = |why: &str| -> Vec<Trial> {
        cases()
            .into_iter()
            .map(|c| {
                Trial::test(c.name, || Ok(()))
                    .with_ignored_flag(true)
                    .with_kind(why.to_owned())
            })
            .collect()
    };
    if let Err(why) = prerequisites() {
        let mut trials = ignore_all(&why);
        trials.push(
            Trial::test("pvm_host_fails_fast", || Ok(()))
                .with_ignored_flag(true)
                .with_kind(why),
        );
        libtest_mimic::run(&args, trials).exit();
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let rt = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));

    let vmm = match ChvBuilder::from_env().build() {
        Ok(v) => v,
        Err(e) => {
            let why = format!("the Cloud Hypervisor driver is unavailable: {e}");
            let mut trials = ignore_all(&why);
            trials.push(
                Trial::test("pvm_host_fails_fast", || Ok(()))
                    .with_ignored_flag(true)
                    .with_kind(why),
            );
            libtest_mimic::run(&args, trials).exit();
        }
    };
    if let Err(e) = vmm.host_check() {
        // The full reason once; the short one beside each ignored case.
        eprintln!("this host cannot run the guest under Cloud Hypervisor: {e}");
        let why = if e.to_string().contains("PVM") {
            "host KVM is PVM: cannot run the Debian guest under CH (see stderr)"
        } else {
            "this host cannot run the guest under CH (see stderr)"
        };
        let mut trials = ignore_all(why);
        let rt2 = rt.clone();
        trials.push(Trial::test("pvm_host_fails_fast", move || {
            rt2.block_on(pvm_host_fails_fast(vmm, e))
        }));
        libtest_mimic::run(&args, trials).exit();
    }

    let state = tempfile::Builder::new()
        .prefix("capsules-contract-chv-")
        .tempdir()
        .expect("a temp dir");
    let setup = rt.block_on(async {
        capsules_microvm::testing::ensure_assets(&[BaseImage::Small]).await?;
        let net = Network::new(
            NetConfig::from_env()
                .map_err(|e| e.to_string())?
                .with_table("capsules_test"),
        )
        .await
        .map_err(|e| e.to_string())?;
        MicroVmBackend::builder(vmm)
            .state_dir(state.path())
            .network(Arc::new(net))
            .build()
            .await
            .map_err(|e| format!("could not build the Cloud Hypervisor backend: {}", e.chain()))
    });
    let backend: Arc<dyn Backend> = match setup {
        Ok(b) => Arc::new(b),
        Err(why) => libtest_mimic::run(&args, ignore_all(&why)).exit(),
    };
    let echo = SpawnEchoServer::new(PERL_TCP_ECHO_ARGV);
    let runner = Arc::new(Runner::new(backend, Arc::new(echo)).share_capsule(true));
    let mut trials: Vec<Trial> = cases()
        .into_iter()
        .map(|case| {
            let skip = runner.skip_reason(&case);
            let (r, rt) = (runner.clone(), rt.clone());
            let t = Trial::test(case.name, move || {
                rt.block_on(r.run(&case)).map_err(|f| Failed::from(f.to_string()))
            });
            match skip {
                Some(why) => t.with_ignored_flag(true).with_kind(why),
                None => t,
            }
        })
        .collect();
    trials.push(
        Trial::test("pvm_host_fails_fast", || Ok(()))
            .with_ignored_flag(true)
            .with_kind("this host can run the guest under Cloud Hypervisor"),
    );
    let conclusion = libtest_mimic::run(&args, trials);
    if let Err(e) = rt.block_on(runner.finish()) {
        eprintln!("cleanup: {e}");
    }
    // `exit()` runs no destructors: drop the backend and remove the state dir first.
    drop(runner);
    if let Err(e) = state.close() {
        eprintln!("could not remove the state dir: {e}");
    }
    conclusion.exit();
}

/// On a host whose KVM cannot run the stock Debian kernel (PVM), building the backend — the step
/// before any capsule can be created — fails in under a second, says why, and names QEMU.
async fn pvm_host_fails_fast(vmm: capsules_backend_chv::ChvVmm, check: VmmError) -> Result<(), Failed> {
    let msg = check.to_string();
    if !msg.contains("qemu") && !msg.contains("QEMU") {
        return Err(format!("the host check does not name the QEMU backend: {msg}").into());
    }
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let built = MicroVmBackend::builder(vmm)
        .state_dir(state.path())
        .no_network()
        .build()
        .await;
    let took = t.elapsed();
    match built {
        Ok(_) => Err("the backend was built on a host that cannot run the guest".into()),
        Err(e) if took < Duration::from_secs(1) => {
            let text = e.chain();
            if e.kind() != capsules_core::ErrorKind::Unsupported {
                return Err(format!("expected Unsupported, got {:?}: {text}", e.kind()).into());
            }
            if !(text.contains("PVM") || text.contains("/dev/kvm")) || !text.to_lowercase().contains("qemu") {
                return Err(format!("the error does not explain the host or name QEMU: {text}").into());
            }
            eprintln!("refused in {took:?}: {text}");
            Ok(())
        }
        Err(e) => Err(format!("refusing took {took:?} (limit 1 s): {}", e.chain()).into()),
    }
}
