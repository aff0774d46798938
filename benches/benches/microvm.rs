//! Real-microVM benches on QEMU: cold create → first exec output, wake → first exec output,
//! sleep, and an exec round trip (`true`).
//!
//! Needs root, QEMU, `ip` and `nft` (and builds the `small` guest image if missing); without them it
//! prints why and benches nothing. Like the real-VM tests, the process first moves into a network
//! namespace of its own. Samples are few (`sample_size(10)`, flat sampling): a cold boot under TCG
//! takes seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_core::backend::{CapsuleSpec, ExecEvent, ExecRequest};
use capsules_core::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};
use capsules_core::{Backend, BackendExt};
use capsules_microvm::assets::{AssetBuilder, BaseImage, Progress};
use capsules_microvm::backend::MicroVmBackend;
use capsules_microvm::net::{NetConfig, Network};
use criterion::{Criterion, SamplingMode};
use futures::StreamExt;

type B = MicroVmBackend<QemuVmm>;

static N: AtomicU32 = AtomicU32::new(0);

fn spec() -> CapsuleSpec {
    let n = N.fetch_add(1, Ordering::SeqCst);
    CapsuleSpec {
        id: CapsuleId::generate(),
        name: CapsuleName::new(format!("bench-{}-{n}", std::process::id())).expect("a valid name"),
        team: TeamId::generate(),
        size: Size::S1x1gb,
        image: Image::Small,
        disk_gib: 2,
        network: NetworkPolicy::Internet,
    }
}

/// Runs `echo hi` and returns once its first output arrived (then drains it).
async fn first_output(b: &B, id: &CapsuleId) {
    let mut s = b.exec(id, ExecRequest::new(["echo", "hi"])).await.expect("exec");
    loop {
        match s.events.next().await {
            Some(Ok(ExecEvent::Stdout(_))) => break,
            Some(Ok(_)) => continue,
            other => panic!("no output: {other:?}"),
        }
    }
    while s.events.next().await.is_some() {}
}

async fn setup(state: &std::path::Path) -> Result<B, String> {
    let assets = AssetBuilder::from_env()
        .build()
        .map_err(|e| format!("guest assets: {e}"))?;
    tokio::task::spawn_blocking(move || assets.ensure(&[BaseImage::Small], Progress::Stderr))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("could not build the guest assets: {e}"))?;
    let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let net = Network::new(
        NetConfig::from_env()
            .map_err(|e| e.to_string())?
            .with_table("capsules_bench")
            .with_tap_prefix("cpb"),
    )
    .await
    .map_err(|e| e.to_string())?;
    MicroVmBackend::builder(vmm)
        .state_dir(state)
        .network(Arc::new(net))
        .build()
        .await
        .map_err(|e| format!("could not build the QEMU backend: {e}"))
}

fn main() {
    if let Err(why) = capsules_microvm::testing::check_prerequisites(capsules_microvm::testing::QEMU_TOOLS) {
        eprintln!("microvm benches skipped: {why}");
        return;
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("microvm benches skipped: cannot create a network namespace: {e}");
        return;
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let state = tempfile::Builder::new()
        .prefix("capsules-bench-microvm-")
        .tempdir()
        .expect("a temp dir");
    let b = match rt.block_on(setup(state.path())) {
        Ok(b) => b,
        Err(why) => {
            eprintln!("microvm benches skipped: {why}");
            return;
        }
    };
    eprintln!("backend: {:?}", b.info());

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("microvm");
    g.sampling_mode(SamplingMode::Flat);

    g.bench_function("cold_create_to_first_output", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let s = spec();
                    let t = Instant::now();
                    b.create(&s).await.expect("create");
                    first_output(&b, &s.id).await;
                    total += t.elapsed();
                    b.terminate(&s.id).await.expect("terminate");
                }
                total
            })
        })
    });

    let s = spec();
    rt.block_on(b.create(&s)).expect("create");
    g.bench_function("wake_to_first_output", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.sleep(&s.id).await.expect("sleep");
                    let t = Instant::now();
                    b.wake(&s.id).await.expect("wake");
                    first_output(&b, &s.id).await;
                    total += t.elapsed();
                }
                total
            })
        })
    });
    g.bench_function("sleep", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.wake(&s.id).await.expect("wake");
                    let t = Instant::now();
                    b.sleep(&s.id).await.expect("sleep");
                    total += t.elapsed();
                }
                b.wake(&s.id).await.expect("wake");
                total
            })
        })
    });
    g.bench_function("exec_true_round_trip", |bn| {
        bn.iter(|| {
            rt.block_on(async {
                let o = b.exec_collect(&s.id, ExecRequest::new(["true"])).await.expect("exec");
                assert!(o.status.success());
            })
        })
    });
    g.finish();
    if let Err(e) = rt.block_on(b.terminate(&s.id)) {
        eprintln!("cleanup: terminate: {e}");
    }
    c.final_summary();
}
