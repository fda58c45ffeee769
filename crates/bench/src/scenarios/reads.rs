//! Reads: GetDailyBalance of the warm set against the bare tonic server, at
//! its maximum and at half of it, and the same reads through the REST
//! gateway.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use secrecy::SecretString;

use super::{
    SECRET, WARM_DATE, WARM_MERCHANTS,
    bench::Bench,
    calls::{balance_op, ratio, read_warm_set},
    ceilings::{BareTonic, ghz_reads},
    targets::Targets,
};
use crate::load::{Outcome, Stats};

/// GetDailyBalance in a closed loop, against the bare tonic server (and,
/// with ghz, the same through ghz).
pub(super) async fn balance(b: &mut Bench, t: &Targets, bare: &BareTonic) -> anyhow::Result<Stats> {
    // The warm set is read again first: the phases since it was loaded
    // outlast the cache's TTL (60 s), and answers expiring mid-phase would
    // measure a refill of the cache, not the warm path this phase is about.
    read_warm_set(&t.balances).await?;
    let bal = b.measure("balance (GetDailyBalance, warm)", b.closed(), balance_op(t.balances.clone())).await;
    let bal_ratio = ratio(bal.throughput(), bare.max.throughput());
    b.report.verdict(
        "balance ≥ 60% of bare tonic",
        format!("{:.0}/s vs {:.0}/s: {:.0}%", bal.throughput(), bare.max.throughput(), bal_ratio * 100.0),
        bal_ratio >= 0.6 && bal.errors == 0,
    );
    if let (Some(bare), Some(fluxo)) = (&bare.ghz, ghz_reads(b, &t.balance.grpc, "balance (warm)")?) {
        b.report.fact(
            "GetDailyBalance through ghz, fluxo vs bare tonic",
            format!("{:.0}/s vs {:.0}/s: {:.0}%", fluxo.rps, bare.rps, ratio(fluxo.rps, bare.rps) * 100.0),
        );
    }
    Ok(bal)
}

/// balance and the bare server at the same constant rate, half of balance's
/// maximum, to compare their p99; the bare server is stopped afterwards.
pub(super) async fn balance_at_half_load(b: &mut Bench, bare: BareTonic, t: &Targets, bal: &Stats) {
    let half = bal.throughput() / 2.0;
    let bal_half = b.measure("balance at half its max", b.open(half), balance_op(t.balances.clone())).await;
    let bare_half =
        b.measure("ceiling: bare tonic at the same rate", b.open(half), balance_op(bare.clients)).await;
    let p99_ratio = ratio(bal_half.ms(0.99), bare_half.ms(0.99));
    b.report.verdict(
        "balance p99 ≤ 2× ceiling p99 at half max load",
        format!(
            "{:.2} ms vs {:.2} ms at {half:.0}/s: {p99_ratio:.1}×",
            bal_half.ms(0.99),
            bare_half.ms(0.99)
        ),
        p99_ratio <= 2.0 && bal_half.failed() == 0,
    );
    b.stop(bare.proc, Duration::from_secs(5));
}

/// The warm balances through the gateway's REST API (an admin token), against
/// balance over gRPC.
pub(super) async fn rest(b: &mut Bench, t: &Targets, bal: &Stats) -> anyhow::Result<()> {
    let rest_addr = t.gateway.rest.clone().context("the gateway printed no REST address")?;
    let token = fluxo_gateway::auth::TokenSpec {
        valid_for_secs: 24 * 3600,
        ..fluxo_gateway::auth::TokenSpec::admin("fluxo-bench")
    }
    .sign_hs256(&SecretString::from(SECRET.to_owned()), "fluxo", "fluxo-api")?;
    let http: HttpClient<HttpConnector, Empty<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).pool_max_idle_per_host(b.args.concurrency).build_http();
    let bearer = Arc::new(format!("Bearer {token}"));
    let op = move |i: u64| {
        let uri = format!("http://{rest_addr}/v1/merchants/w-{}/balances/{WARM_DATE}", i % WARM_MERCHANTS);
        get(http.clone(), uri, bearer.clone())
    };
    let rest = b.measure("rest (GET balance via gateway)", b.closed(), op).await;
    let rest_ratio = ratio(rest.throughput(), bal.throughput());
    b.report.verdict(
        "rest ≥ 50% of balance over gRPC",
        format!("{:.0}/s vs {:.0}/s: {:.0}%", rest.throughput(), bal.throughput(), rest_ratio * 100.0),
        rest_ratio >= 0.5 && rest.errors == 0,
    );
    Ok(())
}

/// One authenticated GET, its body read: 200 is served, 429 shed.
async fn get(http: HttpClient<HttpConnector, Empty<Bytes>>, uri: String, bearer: Arc<String>) -> Outcome {
    let request = match http::Request::get(uri)
        .header(http::header::AUTHORIZATION, bearer.as_str())
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    match http.request(request).await {
        Ok(response) => {
            let status = response.status();
            let body = response.into_body().collect().await;
            match (status.as_u16(), body) {
                (200, Ok(_)) => Outcome::Ok,
                (429, _) => Outcome::Shed,
                (code, _) => Outcome::Error(format!("HTTP {code}")),
            }
        }
        Err(e) => Outcome::Error(e.to_string()),
    }
}
