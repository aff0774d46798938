//! The route handlers: parse, call `Capsules`, answer. No policy here: core enforces it all.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capsules_client::wire::{
    CapsuleCreate, CapsulePage, CapsuleUpdate, CapsuleUsage, Events, ExecSpec, ExposeRequest, FileList, GrantRequest,
    Ledger, PreviewTokenRequest, Revoked, SignalRequest, TeamCreate, TeamCreated, TeamUsage, TokenCreate, TokenCreated,
    TokenInfo, TokenList, Written,
};
use capsules_core::backend::{ByteStream, ExecRequest};
use capsules_core::types::{MicroCredits, Size, TeamCaps};
use capsules_core::{CapsuleHandle, Client, Error, ListOptions, MintedToken, TokenSpec};
use futures::TryStreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, Bearer, STDIN_LIMIT, parse_json, read_body};
use crate::view;

type Res<T> = Result<T, ApiError>;

fn client(st: &AppState, bearer: &Bearer) -> Res<Client> {
    Ok(st.capsules.connect(&bearer.0)?)
}

fn handle(st: &AppState, bearer: &Bearer, capsule: &str) -> Res<CapsuleHandle> {
    Ok(client(st, bearer)?.capsule(capsule)?)
}

fn minted(t: &MintedToken) -> TokenCreated {
    TokenCreated {
        id: t.id.clone(),
        secret: t.secret.expose().to_owned(),
        token: TokenInfo::from(&t.record),
    }
}

fn body_stream(body: Body) -> ByteStream {
    Box::pin(
        body.into_data_stream()
            .map_err(|e| Error::unavailable("the upload was cut short").with_source(e)),
    )
}

fn secs(what: &str, s: u64) -> Res<Duration> {
    if s == 0 {
        return Err(ApiError::invalid(format!("{what} must be at least 1 second")));
    }
    Ok(Duration::from_secs(s))
}

// ---- tokens ----

pub(crate) async fn create_token(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiJson(req): ApiJson<TokenCreate>,
) -> Res<impl IntoResponse> {
    if req.scopes.is_empty() {
        return Err(ApiError::invalid("a token needs at least one scope"));
    }
    let mut spec = TokenSpec::parse_scopes(&req.scopes)?;
    if let Some(p) = req.prefix {
        spec = spec.prefix(p);
    }
    if let Some(sizes) = req.sizes {
        let sizes = sizes
            .iter()
            .map(|s| Size::parse(s))
            .collect::<capsules_core::Result<Vec<_>>>()?;
        spec = spec.sizes(sizes);
    }
    if let Some(c) = req.max_credit_limit {
        spec = spec.max_credit_limit(MicroCredits::parse(&c)?);
    }
    if let Some(s) = req.expires_in_secs {
        spec = spec.ttl(secs("expires_in_secs", s)?);
    }
    if let Some(l) = req.label {
        spec = spec.label(l);
    }
    let t = st.capsules.tokens(&bearer.0).create(spec).await?;
    Ok((StatusCode::CREATED, Json(minted(&t))))
}

pub(crate) async fn list_tokens(State(st): State<AppState>, bearer: Bearer) -> Res<Json<TokenList>> {
    let v = st.capsules.tokens(&bearer.0).list().await?;
    Ok(Json(TokenList {
        tokens: v.iter().map(TokenInfo::from).collect(),
    }))
}

pub(crate) async fn revoke_token(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(id): ApiPath<String>,
) -> Res<Json<Revoked>> {
    let revoked = st.capsules.tokens(&bearer.0).revoke(&id).await?;
    Ok(Json(Revoked { revoked }))
}

// ---- capsules ----

pub(crate) async fn create_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CapsuleCreate>,
) -> Res<Response> {
    let c = client(&st, &bearer)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| ApiError::invalid("the Idempotency-Key header must be 1-200 characters of text"))?;
            Some(k.to_owned())
        }
    };
    let Some(key) = key else {
        let rec = run_create(&c, req).await.map_err(create_field)?;
        return Ok((StatusCode::CREATED, Json(view::capsule(&st.config, &rec))).into_response());
    };
    let cell = {
        let who = hex::encode(capsules_core::tokens::hash_secret(&bearer.0));
        let mut m = st
            .idempotency
            .lock()
            .map_err(|_| Error::internal("the idempotency table is poisoned"))?;
        m.entry((who, key)).or_default().clone()
    };
    let mut first = false;
    let rec = cell
        .get_or_try_init(|| {
            first = true;
            run_create(&c, req)
        })
        .await
        .map_err(create_field)?
        .clone();
    let status = if first { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        [("idempotent-replayed", if first { "false" } else { "true" })],
        Json(view::capsule(&st.config, &rec)),
    )
        .into_response())
}

/// Names the create field an error concerns, so the console shows it beside that field. Core's
/// errors name what was wrong in their messages; this reads the subject they start with (or the
/// name prefix a policy denial cites).
fn create_field(mut e: ApiError) -> ApiError {
    if e.field.is_some() {
        return e;
    }
    let m = e.error.message().to_ascii_lowercase();
    let name_taken = e.error.kind() == capsules_core::ErrorKind::AlreadyExists;
    let field = if name_taken || m.contains("name prefix") || m.starts_with("capsule name") || m.starts_with("name ") {
        Some("name")
    } else if m.contains("credit limit") || m.starts_with("amount") {
        Some("credit_limit")
    } else if m.contains("disk") {
        Some("disk_gib")
    } else if m.starts_with("size") {
        Some("size")
    } else if m.contains("idle_timeout") || m.contains("idle timeout") {
        Some("idle_timeout_secs")
    } else if m.contains("max_runtime") || m.contains("max runtime") {
        Some("max_runtime_secs")
    } else if m.contains("network") || m.contains("cidr") {
        Some("network")
    } else if m.starts_with("image") {
        Some("image")
    } else if m.starts_with("region") {
        Some("region")
    } else {
        None
    };
    e.field = field;
    e
}

async fn run_create(c: &Client, req: CapsuleCreate) -> Res<capsules_core::records::CapsuleRecord> {
    // The fields a form shows errors beside are checked first, so their errors name the field.
    let field = |f: &'static str| move |e: Error| ApiError::from(e).with_field(Some(f));
    capsules_core::types::CapsuleName::new(req.name.clone()).map_err(field("name"))?;
    if let Some(v) = &req.size {
        Size::parse(v).map_err(field("size"))?;
    }
    if let Some(v) = &req.credit_limit {
        MicroCredits::parse(v).map_err(field("credit_limit"))?;
    }
    if let Some(v) = &req.network {
        capsules_core::types::NetworkPolicy::parse(v).map_err(field("network"))?;
    }
    let mut b = c.create(req.name);
    if let Some(v) = req.size {
        b = b.size(v);
    }
    if let Some(v) = req.image {
        b = b.image(v);
    }
    if let Some(v) = req.region {
        b = b.region(v);
    }
    if let Some(v) = req.credit_limit {
        b = b.credit_limit(v);
    }
    if let Some(v) = req.disk_gib {
        b = b.disk_gib(v);
    }
    if let Some(v) = req.network {
        b = b.network(v);
    }
    if let Some(v) = req.idle_timeout_secs {
        b = b.idle_timeout(secs("idle_timeout_secs", v).map_err(|e| e.with_field(Some("idle_timeout_secs")))?);
    }
    if let Some(v) = req.max_runtime_secs {
        b = b.max_runtime(secs("max_runtime_secs", v).map_err(|e| e.with_field(Some("max_runtime_secs")))?);
    }
    let h = b.await?;
    Ok(h.status().await?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    include_terminated: Option<bool>,
}

const MAX_PAGE: u32 = 500;

pub(crate) async fn list_capsules(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Res<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(format!("limit must be 1-{MAX_PAGE}")));
    }
    // The cursor is the id of the last capsule of the previous page (ids are stable).
    let mut v = client(&st, &bearer)?
        .list_with(ListOptions {
            include_terminated: q.include_terminated.unwrap_or(false),
        })
        .await?;
    v.sort_by(|a, b| (a.created_at_ms, a.id.as_str()).cmp(&(b.created_at_ms, b.id.as_str())));
    let start = match &q.cursor {
        None => 0,
        Some(c) => {
            v.iter()
                .position(|r| r.id.as_str() == c)
                .ok_or_else(|| ApiError::invalid("the cursor does not name a capsule of this list"))?
                + 1
        }
    };
    let page: Vec<_> = v.into_iter().skip(start).take(limit as usize + 1).collect();
    let more = page.len() > limit as usize;
    let mut page = page;
    page.truncate(limit as usize);
    let next_cursor = if more {
        page.last().map(|r| r.id.as_str().to_owned())
    } else {
        None
    };
    let page = CapsulePage {
        capsules: page,
        next_cursor,
    };
    Ok(Json(view::page(&st.config, &page)))
}

pub(crate) async fn get_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(view::capsule_response(
        &st.config,
        &handle(&st, &bearer, &c)?.status().await?,
    ))
}

pub(crate) async fn update_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiJson(req): ApiJson<CapsuleUpdate>,
) -> Res<Response> {
    let h = handle(&st, &bearer, &c)?;
    let mut b = h.update();
    if let Some(v) = req.credit_limit {
        b = b.credit_limit(v);
    }
    if let Some(v) = req.idle_timeout_secs {
        b = b.idle_timeout(secs("idle_timeout_secs", v)?);
    }
    if let Some(v) = req.max_runtime_secs {
        b = b.max_runtime(secs("max_runtime_secs", v)?);
    }
    if let Some(v) = req.network {
        b = b.network(v);
    }
    Ok(view::capsule_response(&st.config, &b.await?))
}

pub(crate) async fn terminate_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(view::capsule_response(
        &st.config,
        &handle(&st, &bearer, &c)?.terminate().await?,
    ))
}

pub(crate) async fn sleep_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(view::capsule_response(
        &st.config,
        &handle(&st, &bearer, &c)?.sleep().await?,
    ))
}

pub(crate) async fn wake_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(view::capsule_response(
        &st.config,
        &handle(&st, &bearer, &c)?.wake().await?,
    ))
}

pub(crate) async fn restart_capsule(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(view::capsule_response(
        &st.config,
        &handle(&st, &bearer, &c)?.restart().await?,
    ))
}

// ---- commands ----

fn exec_request(spec: ExecSpec) -> Res<ExecRequest> {
    if spec.argv.is_empty() {
        return Err(ApiError::invalid("argv needs at least a program name"));
    }
    let mut req = ExecRequest::new(spec.argv);
    req.env = spec.env;
    req.cwd = spec.cwd;
    req.timeout = spec.timeout_secs.map(|s| secs("timeout_secs", s)).transpose()?;
    req.output_cap = spec.output_cap;
    Ok(req)
}

/// `POST .../exec`: a JSON spec as the body (no stdin), or the spec in `Capsule-Exec` and stdin
/// as the raw body.
pub(crate) async fn exec(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Res<Response> {
    let h = handle(&st, &bearer, &c)?;
    let (spec, stdin): (ExecSpec, Option<bytes::Bytes>) = match headers.get("capsule-exec") {
        Some(v) => {
            let spec = parse_json(v.as_bytes())
                .map_err(|e| ApiError::invalid(format!("the Capsule-Exec header: {}", e.error.message())))?;
            (spec, Some(read_body(body, STDIN_LIMIT).await?))
        }
        None => {
            crate::extract::check_json_type(&headers)?;
            (parse_json(&read_body(body, crate::extract::JSON_LIMIT).await?)?, None)
        }
    };
    let req = exec_request(spec)?;
    let mut b = h.exec(req.argv);
    for (k, v) in req.env {
        b = b.env(k, v);
    }
    if let Some(cwd) = req.cwd {
        b = b.cwd(cwd);
    }
    if let Some(t) = req.timeout {
        b = b.timeout(t);
    }
    if let Some(cap) = req.output_cap {
        b = b.output_cap(cap);
    }
    if let Some(s) = stdin {
        b = b.stdin(s);
    }
    Ok(crate::ndjson::response(b.stream().await?))
}

pub(crate) async fn spawn(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiJson(spec): ApiJson<ExecSpec>,
) -> Res<Response> {
    let info = handle(&st, &bearer, &c)?.spawn(exec_request(spec)?).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub(crate) async fn processes(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    Ok(Json(handle(&st, &bearer, &c)?.processes().await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OffsetQuery {
    offset: Option<u64>,
}

pub(crate) async fn process_output(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath((c, p)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<OffsetQuery>,
) -> Res<Response> {
    let s = handle(&st, &bearer, &c)?.attach(&p, q.offset.unwrap_or(0)).await?;
    Ok(crate::ndjson::response(s))
}

pub(crate) async fn signal(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath((c, p)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Res<StatusCode> {
    handle(&st, &bearer, &c)?.signal(&p, req.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- files ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathQuery {
    path: Option<String>,
    recursive: Option<bool>,
}

impl PathQuery {
    fn path(&self) -> Res<&str> {
        self.path
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::invalid("this call needs ?path=<path in the capsule>"))
    }
}

pub(crate) async fn write_file(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
    body: Body,
) -> Res<Response> {
    let h = handle(&st, &bearer, &c)?;
    let n = h.write_file_stream(q.path()?, body_stream(body), None).await?;
    Ok(Json(Written { bytes: n }).into_response())
}

pub(crate) async fn read_file(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Res<Response> {
    let s = handle(&st, &bearer, &c)?.read_file_stream(q.path()?).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(s),
    )
        .into_response())
}

pub(crate) async fn remove_file(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Res<StatusCode> {
    handle(&st, &bearer, &c)?
        .remove(q.path()?, q.recursive.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn list_files(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Res<Json<FileList>> {
    let path = q.path.as_deref().unwrap_or("/workspace");
    let entries = handle(&st, &bearer, &c)?.list_dir(path).await?;
    Ok(Json(FileList { entries }))
}

pub(crate) async fn upload_tar(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
    body: Body,
) -> Res<StatusCode> {
    let dest = q.path.as_deref().unwrap_or("/workspace");
    handle(&st, &bearer, &c)?.upload_tar(dest, body_stream(body)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn download_tar(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Res<Response> {
    let s = handle(&st, &bearer, &c)?.download_tar(q.path()?).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], Body::from_stream(s)).into_response())
}

// ---- usage, audit, logs ----

pub(crate) async fn capsule_usage(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Json<serde_json::Value>> {
    let h = handle(&st, &bearer, &c)?;
    let u = h.usage().await?;
    let events = h.events().await?;
    let u = CapsuleUsage {
        capsule: u.capsule,
        usage: u.usage,
        entries: u.entries,
        events,
    };
    Ok(Json(view::usage(&st.config, &u)))
}

pub(crate) async fn capsule_events(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Json<Events>> {
    Ok(Json(Events {
        events: handle(&st, &bearer, &c)?.events().await?,
    }))
}

pub(crate) async fn capsule_logs(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<Response> {
    let logs = handle(&st, &bearer, &c)?.logs().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], logs).into_response())
}

// ---- URL ----

pub(crate) async fn expose(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    ApiJson(req): ApiJson<ExposeRequest>,
) -> Res<Response> {
    let access = req.access.unwrap_or_else(|| "token".to_owned());
    let url = handle(&st, &bearer, &c)?.expose(req.port, access).await?;
    Ok(Json(view::url(&st.config, &url)).into_response())
}

pub(crate) async fn unexpose(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Res<StatusCode> {
    handle(&st, &bearer, &c)?.unexpose().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- catalogue ----

/// `GET /v1/sizes`: the approved sizes with their bounds and compute rate (public: the catalogue
/// is the same for every caller).
pub(crate) async fn sizes(State(st): State<AppState>) -> Json<serde_json::Value> {
    let rates = st.capsules.rates();
    let sizes: Vec<_> = Size::ALL
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.as_str(),
                "vcpus": s.vcpus(),
                "memory_mib": s.memory_mib(),
                "max_disk_gib": s.max_disk_gib(),
                "compute_per_minute": rates.compute_minute(*s),
            })
        })
        .collect();
    Json(serde_json::json!({ "sizes": sizes, "storage_gib_hour": rates.storage_gib_hour }))
}

/// Longest life of a preview token (7 days); the default is an hour.
pub(crate) const PREVIEW_TTL_MAX: u64 = 7 * 24 * 3600;
pub(crate) const PREVIEW_TTL_DEFAULT: u64 = 3600;

/// `POST .../preview-token`: a `preview` token for this capsule (body optional).
pub(crate) async fn preview_token(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Res<Response> {
    let h = handle(&st, &bearer, &c)?;
    let bytes = read_body(body, crate::extract::JSON_LIMIT).await?;
    // The body is optional; one that is sent is JSON like every other body.
    let req: PreviewTokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        PreviewTokenRequest::default()
    } else {
        crate::extract::check_json_type(&headers)?;
        parse_json(&bytes)?
    };
    let ttl = req.ttl_secs.unwrap_or(PREVIEW_TTL_DEFAULT);
    if ttl == 0 || ttl > PREVIEW_TTL_MAX {
        return Err(ApiError::invalid(format!(
            "ttl_secs must be 1-{PREVIEW_TTL_MAX} (7 days), not {ttl}"
        )));
    }
    let t = h.preview_token(Duration::from_secs(ttl)).await?;
    Ok((StatusCode::CREATED, Json(minted(&t))).into_response())
}

// ---- team ----

pub(crate) async fn team_usage(State(st): State<AppState>, bearer: Bearer) -> Res<Json<TeamUsage>> {
    let u = client(&st, &bearer)?.usage().await?;
    Ok(Json(TeamUsage {
        balance: u.balance,
        running: u.running,
        running_vcpus: u.running_vcpus,
        usage: u.usage,
    }))
}

pub(crate) async fn team_ledger(State(st): State<AppState>, bearer: Bearer) -> Res<Json<Ledger>> {
    let c = client(&st, &bearer)?;
    let entries = c.ledger().await?;
    let balance = c.balance().await?;
    Ok(Json(Ledger { balance, entries }))
}

pub(crate) async fn team_events(State(st): State<AppState>, bearer: Bearer) -> Res<Json<Events>> {
    Ok(Json(Events {
        events: client(&st, &bearer)?.team_events().await?,
    }))
}

// ---- operator ----

pub(crate) async fn create_team(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiJson(req): ApiJson<TeamCreate>,
) -> Res<Response> {
    let t = st.capsules.operator(&bearer.0).create_team(&req.name).await?;
    let body = TeamCreated {
        team: t.team,
        owner: minted(&t.owner),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) async fn grant(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(team): ApiPath<String>,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Res<Response> {
    let e = st
        .capsules
        .operator(&bearer.0)
        .grant(&team, req.amount, &req.reason)
        .await?;
    Ok((StatusCode::CREATED, Json(e)).into_response())
}

/// `PUT /v1/teams/{team}/caps`: [`TeamCaps`], with unknown fields refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CapsBody {
    max_running: u32,
    max_vcpus: u32,
    max_size: Size,
    max_storage_gib: u32,
}

pub(crate) async fn set_caps(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(team): ApiPath<String>,
    ApiJson(b): ApiJson<CapsBody>,
) -> Res<Response> {
    let caps = TeamCaps {
        max_running: b.max_running,
        max_vcpus: b.max_vcpus,
        max_size: b.max_size,
        max_storage_gib: b.max_storage_gib,
    };
    Ok(Json(st.capsules.operator(&bearer.0).set_caps(&team, caps).await?).into_response())
}
