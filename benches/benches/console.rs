//! The web console: time from the sign-in click to a listed capsule's page (its usage chart
//! drawn), in headless Chromium against the server in-process on the mock backend with 10
//! capsules. The time is taken by the page itself (`performance.now()`), so WebDriver round trips
//! are not in it. Without Chromium, chromedriver or the built assets the bench says so and exits.

#[path = "../../examples/server/tests/browser/mod.rs"]
mod browser;

use std::time::Duration;

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};

fn sign_in_to_capsule_page(c: &mut Criterion) {
    let dir = capsules_server::webconsole::default_dir();
    if let Err(why) = browser::prerequisites(&dir) {
        eprintln!("console bench: ignored: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (url, agent, driver, session) = rt.block_on(async {
        let capsules = Capsules::builder()
            .backend(MockBackend::new())
            .store(MemoryStore::new())
            .build()
            .await
            .unwrap();
        let boot = capsules.bootstrap("bench").await.unwrap();
        let agent = capsules
            .tokens(boot.owner.secret.expose())
            .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
            .await
            .unwrap()
            .secret
            .expose()
            .to_owned();
        let client = capsules.connect(&agent).unwrap();
        for i in 0..10 {
            client.create(format!("agent-b{i}")).await.unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = capsules_server::app_with(capsules, capsules_server::ServerConfig::default().with_console_dir(dir));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let driver = browser::Driver::start().await.unwrap();
        let session = driver.session(1280, 900).await.unwrap();
        (format!("http://{addr}"), agent, driver, session)
    });
    let mut g = c.benchmark_group("console");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("sign_in_to_capsule_page_mock_10_capsules", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ms = session
                        .time_sign_in_to_capsule_page(&url, &agent, "agent-b9")
                        .await
                        .unwrap();
                    total += Duration::from_secs_f64(ms / 1000.0);
                }
                total
            })
        })
    });
    g.finish();
    rt.block_on(session.quit());
    drop(driver);
}

criterion_group!(benches, sign_in_to_capsule_page);
criterion_main!(benches);
