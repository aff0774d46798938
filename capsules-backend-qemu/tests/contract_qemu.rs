//! The backend contract suite (`capsules_core::testkit::backend`) against real QEMU microVMs.
//!
//! A real-VM target: `.ci/run` runs it explicitly, one case at a time (`--test-threads=1`). The
//! whole process first moves into a network namespace of its own, so the capsule's tap, the
//! backend's nftables table and its DNS forwarder never touch the machine's own network. Shared
//! cases run on one `1x1gb` capsule of the `small` image; a missing prerequisite (root, QEMU,
//! nftables, the guest assets) reports every case as ignored with the reason.

use std::path::Path;
use std::sync::Arc;

use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_core::Backend;
use capsules_core::testkit::backend::{Runner, SpawnEchoServer, cases};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::MicroVmBackend;
use capsules_microvm::net::{NetConfig, Network};
use capsules_microvm::testing::{PERL_TCP_ECHO_ARGV, QEMU_TOOLS, check_prerequisites};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let mut args = Arguments::from_args();
    // A TCG guest takes a core: never run two cases at once.
    args.test_threads = Some(1);
    let ignore_all = |why: String| -> Vec<Trial> {
        cases()
            .into_iter()
            .map(|c| {
                Trial::test(c.name, || Ok(()))
                    .with_ignored_flag(true)
                    .with_kind(why.clone())
            })
            .collect()
    };
    if let Err(why) = check_prerequisites(QEMU_TOOLS) {
        libtest_mimic::run(&args, ignore_all(why)).exit();
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");

    let rt = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    let state = tempfile::Builder::new()
        .prefix("capsules-contract-qemu-")
        .tempdir()
        .expect("a temp state dir");
    let setup = rt.block_on(async {
        // Build (or reuse) the small image first, with progress, so the first case's deadline
        // does not include a cold image build.
        capsules_microvm::testing::ensure_assets(&[BaseImage::Small]).await?;
        let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
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
            .map_err(|e| format!("could not build the QEMU backend: {e}"))
    });
    let backend: Arc<dyn Backend> = match setup {
        Ok(b) => Arc::new(b),
        Err(why) => libtest_mimic::run(&args, ignore_all(why)).exit(),
    };
    eprintln!("backend: {:?}", backend.info());
    let echo = SpawnEchoServer::new(PERL_TCP_ECHO_ARGV);
    let runner = Arc::new(Runner::new(backend.clone(), Arc::new(echo)).share_capsule(true));

    let trials = cases()
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
    let conclusion = libtest_mimic::run(&args, trials);
    if let Err(e) = rt.block_on(runner.finish()) {
        eprintln!("cleanup: {e}");
    }
    leftovers(state.path());
    // `exit()` runs no destructors: drop the backend and remove the state dir first.
    drop(runner);
    drop(backend);
    if let Err(e) = state.close() {
        eprintln!("could not remove the state dir: {e}");
    }
    conclusion.exit();
}

/// Reports (does not fail on) capsule directories a case left behind.
fn leftovers(state: &Path) {
    if let Ok(rd) = std::fs::read_dir(state.join("capsules")) {
        let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        if !left.is_empty() {
            eprintln!("left in the state dir: {left:?}");
        }
    }
}
