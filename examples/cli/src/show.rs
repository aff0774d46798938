//! Tables for people (`--json` prints the API's JSON instead).

use capsules_client::wire::{CapsuleUsage, TeamUsage, TokenInfo};
use capsules_core::events::Event;
use capsules_core::records::CapsuleRecord;

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn at(ms: i64) -> String {
    // UTC wall time without a date library: seconds since the epoch → hh:mm:ss of the day.
    let s = ms.div_euclid(1000);
    let d = s.rem_euclid(86400);
    format!("{:02}:{:02}:{:02}", d / 3600, (d / 60) % 60, d % 60)
}

pub fn token_summary(t: &TokenInfo) -> String {
    let scopes: Vec<&str> = t.scopes.iter().map(|s| s.as_str()).collect();
    let mut s = format!("scopes {}", scopes.join(","));
    if let Some(p) = &t.prefix {
        s.push_str(&format!(", prefix {p}"));
    }
    if let Some(c) = t.max_credit_limit {
        s.push_str(&format!(", max credit limit {c}"));
    }
    s
}

pub fn tokens(v: &[TokenInfo]) {
    table(
        &["ID", "SCOPES", "PREFIX", "LABEL", "REVOKED"],
        v.iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                    t.prefix.clone().unwrap_or_default(),
                    t.label.clone().unwrap_or_default(),
                    if t.revoked_at_ms.is_some() {
                        "yes".into()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect(),
    );
}

pub fn capsules(v: &[CapsuleRecord]) {
    table(
        &["NAME", "ID", "STATE", "SIZE", "SPENT", "CREDIT LIMIT"],
        v.iter()
            .map(|c| {
                vec![
                    c.name.to_string(),
                    c.id.to_string(),
                    c.state.to_string(),
                    c.size.to_string(),
                    c.meter.spent.to_string(),
                    c.limits.credit_limit.to_string(),
                ]
            })
            .collect(),
    );
}

pub fn capsule(c: &CapsuleRecord) {
    println!("name:          {}", c.name);
    println!("id:            {}", c.id);
    println!("state:         {} ({})", c.state, c.state_reason);
    println!(
        "size:          {}  image {}  region {}  disk {} GiB",
        c.size, c.image, c.region, c.disk_gib
    );
    println!("network:       {}", c.network);
    println!(
        "spent:         {} of credit limit {}",
        c.meter.spent, c.limits.credit_limit
    );
    println!(
        "idle timeout:  {}s   max runtime: {}s",
        c.limits.idle_timeout_ms / 1000,
        c.limits.max_runtime_ms / 1000
    );
    if let Some(u) = &c.url {
        println!("url:           {} -> port {} ({})", u.host_label, u.port, u.access);
    }
}

fn detail(e: &Event) -> String {
    let mut v = serde_json::to_value(e.kind()).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("type");
        m.iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                serde_json::Value::Array(a) => format!(
                    "{k}=[{}]",
                    a.iter()
                        .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        String::new()
    }
}

pub fn events(v: &[Event]) {
    table(
        &["TIME (UTC)", "EVENT", "DETAIL"],
        v.iter()
            .map(|e| vec![at(e.event.at_ms), e.kind().name().to_owned(), detail(e)])
            .collect(),
    );
}

pub fn capsule_usage(u: &CapsuleUsage) {
    let c = &u.capsule;
    println!("capsule {} ({}) — {}", c.name, c.id, c.state);
    println!(
        "  compute:          {} minutes  ({})",
        u.usage.compute_minutes, u.usage.compute_cost
    );
    println!(
        "  storage:          {} GiB-hours ({})",
        u.usage.storage_gib_hours, u.usage.storage_cost
    );
    println!(
        "  preview traffic:  {} MiB ({})",
        u.usage.traffic_mib, u.usage.traffic_cost
    );
    println!("  lifecycle events: {}", u.usage.lifecycle_events);
    println!(
        "  cost:             {} of credit limit {}",
        u.usage.cost, c.limits.credit_limit
    );
    println!();
    events(&u.events);
}

pub fn team_usage(u: &TeamUsage) {
    println!("balance:          {}", u.balance);
    println!("running:          {} capsules, {} vCPUs", u.running, u.running_vcpus);
    println!(
        "compute:          {} minutes  ({})",
        u.usage.compute_minutes, u.usage.compute_cost
    );
    println!(
        "storage:          {} GiB-hours ({})",
        u.usage.storage_gib_hours, u.usage.storage_cost
    );
    println!(
        "preview traffic:  {} MiB ({})",
        u.usage.traffic_mib, u.usage.traffic_cost
    );
    println!("spent:            {}", u.usage.cost);
}
