//! One money format on the wire: requests take decimal strings of credits (`"2.00"`), every money
//! field of every answer is integer micro-credits, and openapi.json says so.

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore};
use capsules_server::{OPENAPI, app};
use serde_json::{Value, json};

/// The money fields of requests and answers.
const MONEY: &[&str] = &[
    "balance",
    "amount",
    "spent",
    "cost",
    "compute_cost",
    "storage_cost",
    "traffic_cost",
    "credit_limit",
    "max_credit_limit",
];

/// Every money field anywhere in `v` is an integer (or null where optional); (path, value) of each.
fn money_fields(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                if MONEY.contains(&k.as_str()) && !x.is_object() {
                    assert!(x.is_i64() || x.is_null(), "{p} is {x}, not integer micro-credits");
                    out.push((p.clone(), x.clone()));
                }
                money_fields(x, &p, out);
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| money_fields(x, &format!("{path}[{i}]"), out)),
        _ => {}
    }
}

async fn call(url: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{url}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn every_money_field_in_answers_is_integer_micro_credits() {
    let capsules = Capsules::builder()
        .backend(MockBackend::new())
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let (owner, operator) = (
        boot.owner.secret.expose().to_owned(),
        boot.operator.secret.expose().to_owned(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app(capsules)).await.unwrap() });
    let u = url.as_str();

    let mut seen = Vec::new();
    let grant = call(
        u,
        &operator,
        "POST",
        "/v1/teams/acme/grants",
        Some(json!({"amount": "10.25", "reason": "test"})),
    )
    .await;
    assert_eq!(grant["amount"], 10_250_000, "{grant}");
    let tok = call(
        u,
        &owner,
        "POST",
        "/v1/tokens",
        Some(json!({"scopes": ["agent:write"], "prefix": "m-", "max_credit_limit": "1.50"})),
    )
    .await;
    assert_eq!(tok["token"]["max_credit_limit"], 1_500_000, "{tok}");
    let created = call(
        u,
        &owner,
        "POST",
        "/v1/capsules",
        Some(json!({"name": "m-1", "credit_limit": "2.00"})),
    )
    .await;
    assert_eq!(created["limits"]["credit_limit"], 2_000_000, "{created}");
    let updated = call(
        u,
        &owner,
        "PATCH",
        "/v1/capsules/m-1",
        Some(json!({"credit_limit": "3.000001"})),
    )
    .await;
    assert_eq!(updated["limits"]["credit_limit"], 3_000_001, "{updated}");
    for v in [&grant, &tok, &created, &updated] {
        money_fields(v, "", &mut seen);
    }
    for path in [
        "/v1/team/usage",
        "/v1/team/ledger",
        "/v1/tokens",
        "/v1/capsules",
        "/v1/capsules/m-1",
        "/v1/capsules/m-1/usage",
        "/v1/capsules/m-1/events",
        "/v1/team/events",
    ] {
        money_fields(&call(u, &owner, "GET", path, None).await, path, &mut seen);
    }
    let ledger = call(u, &owner, "GET", "/v1/team/ledger", None).await;
    let sum: i64 = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(
        ledger["balance"].as_i64(),
        Some(sum),
        "the balance is the sum of the entries: {ledger}"
    );
    let cost = call(u, &owner, "GET", "/v1/capsules/m-1/usage", None).await["usage"]["cost"]
        .as_i64()
        .unwrap();
    assert_eq!(sum, 5_000_000 + 10_250_000 - cost, "grants less what m-1 cost");
    // Each money field of the answers above was met at least once, as an integer.
    for name in MONEY {
        assert!(
            seen.iter().any(|(p, v)| p.ends_with(&format!(".{name}")) && v.is_i64()),
            "no answer carried {name}: {seen:?}"
        );
    }
}

#[test]
fn openapi_documents_the_money_format() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Credits"]["type"], "string");
    assert_eq!(schemas["MicroCredits"]["type"], "integer");
    let described = schemas["MicroCredits"]["description"].as_str().unwrap();
    for name in MONEY {
        assert!(described.contains(name), "MicroCredits does not list {name}");
    }
    // Every money property of a request schema is a Credits string.
    let mut n = 0;
    for (schema, s) in schemas.as_object().unwrap() {
        for (prop, p) in s["properties"].as_object().into_iter().flatten() {
            if MONEY.contains(&prop.as_str()) {
                n += 1;
                assert_eq!(p["$ref"], "#/components/schemas/Credits", "{schema}.{prop}");
            }
        }
    }
    assert!(n >= 4, "only {n} money properties in request schemas");
    // The pattern takes what the server parses.
    let pattern = schemas["Credits"]["pattern"].as_str().unwrap();
    assert!(pattern.contains("[0-9]{0,6}"), "{pattern}");
    for ok in ["2", "2.00", "0.5", ".5", "0.000001"] {
        capsules_core::MicroCredits::parse(ok).unwrap();
    }
}
