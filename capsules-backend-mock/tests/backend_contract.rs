//! The backend contract suite (`capsules_core::testkit::backend`) against the mock, one trial
//! per case (skips show as ignored with their reason), plus one trial that runs the shared cases
//! on a single capsule the way a VM backend does.
//!
//! Each trial runs on its own tokio runtime with paused time: the mock uses tokio time only, so
//! `sleep 300` and the suite's deadlines cost nothing, and a hang fails fast instead of waiting.
//! `CAPSULES_MOCK_REAL_TIME=1` runs it on the real clock instead.

use std::sync::Arc;

use async_trait::async_trait;
use capsules_backend_mock::MockBackend;
use capsules_core::Backend;
use capsules_core::testkit::backend::{CapsuleUse, EchoServer, Runner, cases};
use capsules_core::types::CapsuleId;
use libtest_mimic::{Arguments, Failed, Trial};

/// The mock's "start a TCP echo server on port P": a registered in-process handler.
struct MockEcho(MockBackend);

#[async_trait]
impl EchoServer for MockEcho {
    async fn start(&self, _b: &dyn Backend, id: &CapsuleId, port: u16) -> capsules_core::Result<()> {
        self.0.serve_echo(id, port)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // CAPSULES_MOCK_REAL_TIME=1 runs the same on the real clock (slower; checks that nothing
        // depends on paused time).
        .start_paused(std::env::var_os("CAPSULES_MOCK_REAL_TIME").is_none())
        .build()
        .expect("a tokio runtime")
}

fn runner(share: bool) -> Runner {
    let mock = MockBackend::new();
    Runner::new(Arc::new(mock.clone()), Arc::new(MockEcho(mock))).share_capsule(share)
}

fn main() {
    let args = Arguments::from_args();
    let caps = MockBackend::new().capabilities();
    let mut trials: Vec<Trial> = cases()
        .into_iter()
        .map(|case| {
            let name = case.name;
            let skip = case.skip_reason(&caps);
            let t = Trial::test(name, move || {
                let rt = runtime();
                rt.block_on(runner(false).run(&case))
                    .map_err(|f| Failed::from(f.to_string()))
            });
            match skip {
                // libtest-mimic shows the kind next to the name: the reason goes there.
                Some(why) => t.with_ignored_flag(true).with_kind(why),
                None => t,
            }
        })
        .collect();
    trials.push(Trial::test("session::shared_capsule_like_a_vm", || {
        let rt = runtime();
        rt.block_on(async {
            let r = runner(true);
            for case in cases().iter().filter(|c| c.capsule == CapsuleUse::Shared) {
                r.run(case)
                    .await
                    .map_err(|f| Failed::from(format!("{}: {f}", case.name)))?;
            }
            for case in cases().iter().filter(|c| c.capsule == CapsuleUse::Own) {
                r.run(case)
                    .await
                    .map_err(|f| Failed::from(format!("{}: {f}", case.name)))?;
            }
            r.finish().await.map_err(|e| Failed::from(e.to_string()))
        })
    }));
    libtest_mimic::run(&args, trials).exit();
}
