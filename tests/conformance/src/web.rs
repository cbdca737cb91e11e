//! The web layer (routing-axum) on a real cluster, for every backend: causal tokens through
//! header and cookie, an anonymous client's sign-up then log-in under lag, users named by a
//! write, the region header's trust, bad tokens, request-bound transactions, force-primary
//! routes and method defaults. Requests go through the whole axum app with `oneshot`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{Request, Response, StatusCode, header};
use axum::routing::{get, post};
use routing_axum::{Db, Read, RegionHeader, Routing, RoutingLayer, Tx, WebError, Write};
use routing_core::{
    Backend, CausalToken, Consistency, InMemoryMarks, Lsn, Router, RouterConfig, TokenCodec,
    TokenKey, UserKey, WriterMarks,
};
use tower::ServiceExt;

use super::{
    Harness, codec, create_table, delayed_cluster, shared_cluster, table, test_config, token_key,
};

const COOKIE: &str = "read_after";

struct App {
    table: String,
}

type Shared = State<Arc<App>>;

async fn run<B: Backend>(
    pooled: &mut B::Pooled,
    sql: String,
) -> Result<Option<String>, routing_core::BackendError> {
    B::query_text(pooled, &sql).await
}

/// `POST /rows/{id}/{status}`: inserts the row in the request's transaction, names user
/// `created-{id}` for a mark, answers `status` (so the layer commits or rolls back).
async fn create<B: Backend>(
    State(app): Shared,
    Path((id, status)): Path<(u64, u16)>,
    mut tx: Tx<B>,
) -> Result<(StatusCode, String), WebError> {
    let s = tx.session().await?;
    let node = s.node_name().to_string();
    let done = B::execute(
        s.pooled(),
        &format!("INSERT INTO {} (id, note) VALUES ({id}, 'x')", app.table),
    )
    .await;
    s.check_backend(done)?;
    tx.mark_user(format!("created-{id}"));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok((status, node))
}

/// `POST /autocommit/{id}`: an autocommit insert; the handler never calls `finish`.
async fn autocommit<B: Backend>(
    State(app): Shared,
    Path(id): Path<u64>,
    mut w: Write<B>,
) -> Result<String, WebError> {
    let s = w.session().await?;
    let done = B::execute(
        s.pooled(),
        &format!("INSERT INTO {} (id, note) VALUES ({id}, 'x')", app.table),
    )
    .await;
    s.check_backend(done)?;
    Ok(s.node_name().to_string())
}

/// `GET /rows/{id}`: "count node".
async fn count<B: Backend>(
    State(app): Shared,
    Path(id): Path<u64>,
    mut r: Read<B>,
) -> Result<String, WebError> {
    let s = r.session().await?;
    let sql = format!(
        "SELECT pg_catalog.count(*)::pg_catalog.text AS v FROM {} WHERE id = {id}",
        app.table
    );
    let done = run::<B>(s.pooled(), sql).await;
    let n = s.check_backend(done)?.unwrap_or_default();
    Ok(format!("{n} {}", s.node_name()))
}

/// `POST /misroute`: an INSERT through a read session (a handler bug).
async fn misroute<B: Backend>(State(app): Shared, mut r: Read<B>) -> Result<String, WebError> {
    let s = r.session().await?;
    let done = B::execute(
        s.pooled(),
        &format!("INSERT INTO {} (id, note) VALUES (0, 'x')", app.table),
    )
    .await;
    s.check_backend(done)?;
    Ok("written".into())
}

/// `GET|POST /db`: "read node" or "write node".
async fn smart<B: Backend>(mut db: Db<B>) -> Result<String, WebError> {
    db.conn().await?;
    let kind = if db.is_write() { "write" } else { "read" };
    Ok(format!("{kind} {}", db.node_name().unwrap_or("-")))
}

/// `POST /transfer` (force-primary): the nodes of a read and of a write in one request.
async fn transfer<B: Backend>(mut r: Read<B>, mut db: Db<B>) -> Result<String, WebError> {
    r.conn().await?;
    db.conn().await?;
    Ok(format!(
        "{} {} {}",
        r.node_name().unwrap_or("-"),
        db.node_name().unwrap_or("-"),
        db.is_write()
    ))
}

/// `GET /as-user`: a read for the user the handler names itself.
async fn as_user<B: Backend>(
    State(app): Shared,
    routing: Routing<B>,
    mut r: Read<B>,
) -> Result<String, WebError> {
    routing.set_user("named-by-handler");
    let _ = app;
    r.conn().await?;
    Ok(format!(
        "{:?}",
        routing.context().user.map(|u| u.as_bytes().to_vec())
    ))
}

fn app<B: Backend>(layer: RoutingLayer<B>, table: &str) -> axum::Router {
    axum::Router::new()
        .route("/rows/{id}/{status}", post(create::<B>))
        .route("/autocommit/{id}", post(autocommit::<B>))
        .route("/rows/{id}", get(count::<B>))
        .route("/misroute", post(misroute::<B>))
        .route("/db", get(smart::<B>).post(smart::<B>))
        .route(
            "/transfer",
            post(transfer::<B>).layer(routing_axum::force_primary()),
        )
        .route("/as-user", get(as_user::<B>))
        .route("/status", get(routing_axum::status::<B>))
        .layer(layer)
        .with_state(Arc::new(App {
            table: table.to_string(),
        }))
}

async fn router_with<H: Harness>(
    c: &routing_testkit::Cluster,
    mode: Consistency,
    marks: Arc<InMemoryMarks>,
) -> Router<H::B> {
    let config = RouterConfig {
        default_consistency: mode,
        wait_budget: Duration::from_millis(20),
        ..test_config()
    };
    Router::builder(H::backend())
        .nodes(c.node_configs())
        .config(config)
        .tokens(codec())
        .marks(marks)
        .build()
        .await
        .expect("build router")
}

fn request(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .extension(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))))
}

async fn send(app: &axum::Router, req: axum::http::request::Builder) -> Response<Body> {
    app.clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible")
}

async fn text(res: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .expect("body");
    String::from_utf8_lossy(&bytes).into_owned()
}

fn token_of(res: &Response<Body>) -> Option<String> {
    res.headers()
        .get(routing_axum::TOKEN_HEADER)
        .map(|v| v.to_str().expect("ascii").to_string())
}

fn cookie_of(res: &Response<Body>) -> Option<String> {
    res.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{COOKIE}=")))
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
}

/// Reads `id` right after a write that created it, with and without the client's token, on the
/// delayed cluster (replicas 300 ms behind): with it, always fresh; without it (the control),
/// a replica that has not replayed the write at least once.
pub async fn web_tokens_round_trip_through_header_and_cookie<H: Harness>() {
    let c = delayed_cluster();
    let r = router_with::<H>(c, Consistency::Causal, Arc::default()).await;
    let t = table("web_tokens");
    create_table(&r, &t).await;
    // The table itself reaches the replicas only after their apply delay.
    tokio::time::sleep(super::APPLY_DELAY * 2).await;
    let app = app(RoutingLayer::new(r.clone()).token_cookie(COOKIE), &t);
    let (mut stale_control, mut rounds) = (0, 0);
    for id in 1..=6u64 {
        rounds += 1;
        let res = send(&app, request("POST", &format!("/autocommit/{id}"))).await;
        assert_eq!(res.status(), StatusCode::OK, "{}", text(res).await);
        let token = token_of(&res).expect("a committing response carries X-Read-After");
        let cookie = cookie_of(&res).expect("and the token cookie");
        assert_eq!(
            cookie,
            format!("{COOKIE}={token}"),
            "the same token in both"
        );
        let set_cookie = res.headers()[header::SET_COOKIE].to_str().expect("ascii");
        assert!(
            set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
            "{set_cookie}"
        );
        let by_header =
            request("GET", &format!("/rows/{id}")).header(routing_axum::TOKEN_HEADER, &token);
        let body = text(send(&app, by_header).await).await;
        assert!(body.starts_with("1 "), "read with the header token: {body}");
        let by_cookie =
            request("GET", &format!("/rows/{id}")).header(header::COOKIE, format!("a=b; {cookie}"));
        let body = text(send(&app, by_cookie).await).await;
        assert!(body.starts_with("1 "), "read with the cookie: {body}");
        let bare = text(send(&app, request("GET", &format!("/rows/{id}"))).await).await;
        if bare.starts_with("0 ") {
            stale_control += 1;
        }
    }
    assert!(
        stale_control > 0,
        "the control (no token) never read stale in {rounds} rounds: the test could not fail"
    );
}

/// A browser with no user yet signs up (a transaction that creates the account) and logs in
/// at once, looking the account up with no user: the cookie the sign-up set protects the
/// log-in. Without the cookie (the control) the log-in misses the account on a lagging replica.
pub async fn web_anonymous_signup_then_login_reads_its_own_account<H: Harness>() {
    let c = delayed_cluster();
    let r = router_with::<H>(c, Consistency::ReadYourWrites, Arc::default()).await;
    let t = table("web_signup");
    create_table(&r, &t).await;
    // The table itself reaches the replicas only after their apply delay.
    tokio::time::sleep(super::APPLY_DELAY * 2).await;
    let app = app(RoutingLayer::new(r.clone()).token_cookie(COOKIE), &t);
    let mut missed_without_cookie = 0;
    for id in 1..=5u64 {
        let res = send(&app, request("POST", &format!("/rows/{id}/201"))).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let cookie = cookie_of(&res).expect("sign-up sets the token cookie");
        let login = request("GET", &format!("/rows/{id}")).header(header::COOKIE, &cookie);
        let body = text(send(&app, login).await).await;
        assert!(body.starts_with("1 "), "log-in right after sign-up: {body}");
        let id2 = id + 100;
        let res = send(&app, request("POST", &format!("/rows/{id2}/201"))).await;
        assert_eq!(res.status(), StatusCode::CREATED, "{}", text(res).await);
        let body = text(send(&app, request("GET", &format!("/rows/{id2}"))).await).await;
        if body.starts_with("0 ") {
            missed_without_cookie += 1;
        }
    }
    assert!(
        missed_without_cookie > 0,
        "without the cookie no log-in ever missed: the test could not fail"
    );
}

/// A user a write names (a sign-up's new id) gets a mark at the commit's LSN; a rolled-back
/// one gets none. The handler can also name the request's user itself.
pub async fn web_a_user_created_by_a_write_is_marked<H: Harness>() {
    let c = shared_cluster();
    let marks = Arc::new(InMemoryMarks::default());
    let r = router_with::<H>(c, Consistency::ReadYourWrites, marks.clone()).await;
    let t = table("web_marks");
    create_table(&r, &t).await;
    let app = app(RoutingLayer::new(r.clone()), &t);
    let res = send(&app, request("POST", "/rows/7/201")).await;
    let token = r
        .verify_token(&token_of(&res).expect("token"))
        .expect("valid");
    let mark = marks
        .get(&UserKey::from("created-7"))
        .await
        .expect("in memory")
        .expect("the created user has a mark");
    assert_eq!(mark.lsn, token.lsn, "at the commit's LSN");
    let res = send(&app, request("POST", "/rows/8/409")).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert!(
        marks
            .get(&UserKey::from("created-8"))
            .await
            .expect("in memory")
            .is_none(),
        "a rolled-back sign-up marks no one"
    );
    let body = text(send(&app, request("GET", "/as-user")).await).await;
    assert_eq!(body, format!("{:?}", Some(b"named-by-handler".to_vec())));
}

/// Replicas in two regions: the region header picks the local replica when it comes from the
/// trusted proxy, and is ignored (the service's own region) when a client sends it directly.
pub async fn web_region_header_is_trusted_only_from_proxies<H: Harness>() {
    let c = shared_cluster();
    let primary = c.primary();
    let replicas: Vec<usize> = (0..c.nodes().len()).filter(|&i| i != primary).collect();
    let (eu, us) = (replicas[0], replicas[1]);
    let nodes = c.node_configs().into_iter().enumerate().map(|(i, n)| {
        if i == eu {
            n.region("eu")
        } else if i == us {
            n.region("us")
        } else {
            n.region("eu")
        }
    });
    let r = Router::builder(H::backend())
        .nodes(nodes)
        .config(test_config())
        .tokens(codec())
        .build()
        .await
        .expect("router");
    let t = table("web_region");
    create_table(&r, &t).await;
    let layer = RoutingLayer::new(r.clone()).region(
        RegionHeader::new("x-region")
            .trust_proxy("127.0.0.1")
            .fallback("eu"),
    );
    let app = app(layer, &t);
    let served = |body: String| body.split(' ').nth(1).unwrap_or_default().to_string();
    for _ in 0..4 {
        let from_proxy = request("GET", "/rows/1").header("x-region", "us");
        let body = text(send(&app, from_proxy).await).await;
        assert_eq!(
            served(body),
            c.node(us).name(),
            "trusted proxy: the us replica"
        );
        let spoofed = Request::builder()
            .uri("/rows/1")
            .header("x-region", "us")
            .extension(ConnectInfo(SocketAddr::from(([203, 0, 113, 9], 5000))));
        let body = text(send(&app, spoofed).await).await;
        assert_eq!(
            served(body),
            c.node(eu).name(),
            "a client's own region header is ignored"
        );
    }
}

/// Malformed, forged, foreign-cluster and far-future tokens are a 400 with a clear body (a bad
/// cookie is also cleared); a write through a read session is a 500.
pub async fn web_bad_tokens_are_answered_400<H: Harness>() {
    let c = shared_cluster();
    let r = router_with::<H>(c, Consistency::Causal, Arc::default()).await;
    let t = table("web_bad");
    create_table(&r, &t).await;
    // The misrouted INSERT below must meet the table on whichever replica serves it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = app(RoutingLayer::new(r.clone()).token_cookie(COOKIE), &t);
    let res = send(&app, request("POST", "/autocommit/1")).await;
    let good = r
        .verify_token(&token_of(&res).expect("token"))
        .expect("valid");
    let forged = TokenCodec::new(TokenKey::new(1, "another-key-entirely-0123456789").expect("key"))
        .cluster("conformance")
        .sign(&good);
    let foreign = TokenCodec::new(token_key()).cluster("staging").sign(&good);
    let future = codec().sign(&CausalToken {
        lsn: Lsn(good.lsn.0 + (1 << 40)),
        ..good
    });
    for (what, token, needle) in [
        ("malformed", "not-a-token".to_string(), "malformed"),
        ("forged", forged, "signature"),
        ("foreign", foreign, "another cluster"),
        ("far-future", future, "beyond"),
    ] {
        let res = send(
            &app,
            request("GET", "/rows/1").header(routing_axum::TOKEN_HEADER, &token),
        )
        .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{what}");
        let body = text(res).await;
        assert!(body.contains(needle), "{what}: {body}");
        let res = send(
            &app,
            request("GET", "/rows/1").header(header::COOKIE, format!("{COOKIE}={token}")),
        )
        .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{what} cookie");
        if what != "far-future" {
            let clear = res.headers()[header::SET_COOKIE].to_str().expect("ascii");
            assert!(
                clear.contains("Max-Age=0"),
                "{what}: the bad cookie is cleared"
            );
        }
    }
    let res = send(&app, request("POST", "/misroute")).await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text(res).await.contains("read session"));
}

/// A request-bound transaction commits on 2xx/3xx and rolls back on 4xx/5xx: the row is absent
/// and no token is issued.
pub async fn web_transactions_commit_on_success_and_roll_back_otherwise<H: Harness>() {
    let c = shared_cluster();
    let r = router_with::<H>(c, Consistency::Primary, Arc::default()).await;
    let t = table("web_tx");
    create_table(&r, &t).await;
    let app = app(RoutingLayer::new(r.clone()), &t);
    for (id, status, kept) in [
        (1u64, 201u16, true),
        (2, 303, true),
        (3, 422, false),
        (4, 500, false),
        (5, 404, false),
    ] {
        let res = send(&app, request("POST", &format!("/rows/{id}/{status}"))).await;
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(token_of(&res).is_some(), kept, "token after {status}");
        let body = text(send(&app, request("GET", &format!("/rows/{id}"))).await).await;
        let want = if kept { "1 " } else { "0 " };
        assert!(body.starts_with(want), "row {id} after {status}: {body}");
    }
}

/// A force-primary route reads and writes on the primary only; method defaults route `Db` by
/// HTTP method.
pub async fn web_force_primary_and_method_defaults<H: Harness>() {
    let c = shared_cluster();
    let primary = c.node(c.primary()).name().to_string();
    let r = router_with::<H>(c, Consistency::Eventual, Arc::default()).await;
    let t = table("web_routes");
    let app = app(RoutingLayer::new(r.clone()), &t);
    for _ in 0..4 {
        let body = text(send(&app, request("POST", "/transfer")).await).await;
        assert_eq!(
            body,
            format!("{primary} {primary} true"),
            "force-primary route"
        );
        let body = text(send(&app, request("POST", "/db")).await).await;
        assert!(
            body.starts_with("read ") && !body.ends_with(&primary),
            "no defaults: {body}"
        );
    }
    let by_method = app_with_method_defaults::<H::B>(r.clone(), &t);
    for _ in 0..4 {
        let body = text(send(&by_method, request("GET", "/db")).await).await;
        assert!(
            body.starts_with("read ") && !body.ends_with(&primary),
            "GET: {body}"
        );
        let body = text(send(&by_method, request("POST", "/db")).await).await;
        assert_eq!(body, format!("write {primary}"), "POST");
    }
}

/// The ready-made status handler answers the router's status as JSON: every node with its role,
/// the generation, and no password anywhere.
pub async fn web_status_handler_serves_the_router_status<H: Harness>() {
    let c = shared_cluster();
    let r = router_with::<H>(c, Consistency::Eventual, Arc::default()).await;
    let app = app(RoutingLayer::new(r.clone()), "unused");
    let res = send(&app, request("GET", "/status")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = text(res).await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(json["generation"].is_u64(), "{body}");
    let nodes = json["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), c.nodes().len());
    for i in 0..c.nodes().len() {
        assert!(body.contains(c.node(i).name()), "{body}");
    }
    for secret in [
        routing_testkit::WRITER_PASSWORD,
        routing_testkit::READER_PASSWORD,
        routing_testkit::MONITOR_PASSWORD,
    ] {
        assert!(
            !body.contains(secret),
            "the status leaks a password: {body}"
        );
    }
}

pub(crate) fn app_with_method_defaults<B: Backend>(r: Router<B>, t: &str) -> axum::Router {
    app(RoutingLayer::new(r).method_defaults(true), t)
}
