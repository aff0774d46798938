//! The preview proxy's overhead: one small HTTP request round trip through the proxy to a mock
//! capsule's port (TCP to the server, `Host` routing, access check, core's `open`, the mock's
//! in-process stream, HTTP/1.1 to the capsule's server, metering), against the same server
//! reached directly over loopback TCP. Keep-alive clients on both sides.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"hello from the capsule\n",
    ))))
}

async fn serve_http<S>(s: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), hyper::service::service_fn(hello))
        .await;
}

fn preview(c: &mut Criterion) {
    let rt = rt();
    let (proxy_addr, host, direct_addr) = rt.block_on(async {
        let mock = MockBackend::new();
        let capsules = Capsules::builder()
            .backend(mock.clone())
            .store(MemoryStore::new())
            .build()
            .await
            .unwrap();
        let boot = capsules.bootstrap("bench").await.unwrap();
        let cap = capsules
            .connect(boot.owner.secret.expose())
            .unwrap()
            .create("web-1")
            .await
            .unwrap();
        let id = cap.status().await.unwrap().id;
        mock.serve_port(&id, 8080, serve_http).unwrap();
        let url = cap.expose(8080, "public").await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // As the server binary does: TCP_NODELAY on accepted connections.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await });
        let direct = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let direct_addr = direct.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = direct.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve_http(s));
            }
        });
        (
            addr,
            format!("{}.localhost:{}", url.host_label, addr.port()),
            direct_addr,
        )
    });
    let client = reqwest::Client::new();
    let mut g = c.benchmark_group("preview round trip");
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("direct (loopback TCP)", |b| {
        b.to_async(&rt).iter(|| async {
            let r = client.get(format!("http://{direct_addr}/")).send().await.unwrap();
            assert_eq!(r.bytes().await.unwrap().len(), 23);
        })
    });
    g.bench_function("through the proxy (mock capsule)", |b| {
        b.to_async(&rt).iter(|| async {
            let r = client
                .get(format!("http://{proxy_addr}/"))
                .header("host", &host)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.bytes().await.unwrap().len(), 23);
        })
    });
    g.finish();
}

criterion_group!(benches, preview);
criterion_main!(benches);
