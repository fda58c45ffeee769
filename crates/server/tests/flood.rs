//! A burst of calls on one connection, arriving while the server is too busy
//! to read them, is answered call by call and never costs the connection
//! itself. The calls are health checks, which admission never refuses, so
//! every one of them must be served: what is under test is the transport (the
//! per-connection call limit), not admission (the services' API tests cover
//! RESOURCE_EXHAUSTED).

use std::{sync::Arc, time::Duration};

use fluxo_server::{AllReady, GrpcServer, ServerConfig};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const CALLS: usize = 6_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_server_cannot_read_yet_fails_no_call_on_transport() {
    // The server on a runtime of its own with one thread, so the test can
    // stall it the way a saturated CPU does.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        handle_tx.send(rt.handle().clone()).unwrap();
        rt.block_on(async move {
            let server = GrpcServer::bind(ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                max_concurrent_requests: 1024,
                request_timeout: Duration::from_secs(30),
                shutdown_delay: Duration::ZERO,
                shutdown_timeout: Duration::from_secs(5),
                readiness_interval: Duration::from_millis(50),
            })
            .await
            .unwrap();
            addr_tx.send(server.local_addr().unwrap()).unwrap();
            server.serve(Arc::new(AllReady(Vec::new())), futures::future::pending()).await.unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    let server_rt = handle_rx.recv().unwrap();
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let client = HealthClient::new(channel);
    client.clone().check(HealthCheckRequest { service: String::new() }).await.unwrap();

    // Stall the server while the burst is written to its socket.
    server_rt.spawn(async { std::thread::sleep(Duration::from_millis(1_500)) });
    let calls = (0..CALLS).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move { client.check(HealthCheckRequest { service: String::new() }).await })
    });
    let mut served = 0;
    // A stream refused by HTTP/2 (REFUSED_STREAM) was not processed and is safe to
    // retry (client and server can briefly disagree on how many streams are open):
    // tolerated, unlike a lost connection.
    let mut refused_streams = 0;
    let mut failed = std::collections::BTreeMap::<String, usize>::new();
    for call in futures::future::join_all(calls).await {
        let s = match call.unwrap() {
            Ok(_) => {
                served += 1;
                continue;
            }
            Err(s) => s,
        };
        let mut cause = format!("{:?}: {}", s.code(), s.message());
        let mut source = std::error::Error::source(&s);
        while let Some(e) = source {
            cause.push_str(&format!(": {e}"));
            source = e.source();
        }
        if s.code() == tonic::Code::Unavailable && cause.contains("refused stream") {
            refused_streams += 1;
        } else {
            *failed.entry(cause).or_default() += 1;
        }
    }
    assert!(
        failed.is_empty(),
        "{served} served, {refused_streams} streams refused, others failed: {failed:?}"
    );
    assert_eq!(served + refused_streams, CALLS);
}
