//! Who may mint tokens: only the platform's backend, with
//! `auth.token_issuer_key`. The API keys that browsers put in their WebSocket
//! URLs mint nothing, unless the migration switch `auth.allow_api_key_minting`
//! restores the older behaviour (decision 0020).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daisi_testkit::ws::WsClient;
use daisi_testkit::{ADMIN_API_KEY, API_KEY, TOKEN_ISSUER_KEY, eventually};
use support::{RunningEdge, Servers, http};

const USER_BODY: &str = r#"{"company_id":"c1","agent_id":"a1","user_id":"u1","expires_in_seconds":60}"#;
const ADMIN_BODY: &str = r#"{"admin_id":"ad1","expires_in_seconds":60}"#;

/// `(status, error code or "", token or "")` of one mint request.
async fn mint(addr: SocketAddr, path: &str, key: &str, body: &str) -> (u16, String, String) {
    let (status, resp) =
        http(addr, "POST", path, &[("content-type", "application/json"), ("x-api-key", key)], body).await;
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_else(|_| panic!("JSON body: {resp}"));
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    let token = v["token"].as_str().unwrap_or("").to_string();
    (status, code, token)
}

#[tokio::test]
async fn browser_api_keys_mint_nothing_and_the_issuer_key_mints_both_kinds() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let addr = edge.addr();
    for (path, body) in [("/generate-token", USER_BODY), ("/admin/generate-token", ADMIN_BODY)] {
        for key in [API_KEY, ADMIN_API_KEY, "", "not-a-key"] {
            let (status, code, token) = mint(addr, path, key, body).await;
            assert_eq!((status, code.as_str()), (401, "InvalidAPIKey"), "{path} with key {key:?}");
            assert!(token.is_empty());
        }
    }
    let (status, _, user) = mint(addr, "/generate-token", TOKEN_ISSUER_KEY, USER_BODY).await;
    assert_eq!(status, 200);
    WsClient::connect(&edge.user_url("c1", "a1", &user)).await.expect_ready().await;
    let (status, _, admin) = mint(addr, "/admin/generate-token", TOKEN_ISSUER_KEY, ADMIN_BODY).await;
    assert_eq!(status, 200);
    WsClient::connect(&edge.admin_url(&admin)).await.expect_ready().await;
}

#[tokio::test]
async fn allow_api_key_minting_restores_the_seed_behaviour_until_turned_off() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.auth.allow_api_key_minting = true;
    let edge = RunningEdge::start(cfg.clone()).await;
    let addr = edge.addr();

    // The user key mints user tokens, the admin key admin tokens; never the other kind.
    let (status, _, user) = mint(addr, "/generate-token", API_KEY, USER_BODY).await;
    assert_eq!(status, 200);
    WsClient::connect(&edge.user_url("c1", "a1", &user)).await.expect_ready().await;
    let (status, _, admin) = mint(addr, "/admin/generate-token", ADMIN_API_KEY, ADMIN_BODY).await;
    assert_eq!(status, 200);
    WsClient::connect(&edge.admin_url(&admin)).await.expect_ready().await;
    assert_eq!(mint(addr, "/generate-token", ADMIN_API_KEY, USER_BODY).await.0, 401);
    assert_eq!(mint(addr, "/admin/generate-token", API_KEY, ADMIN_BODY).await.0, 401);
    // The issuer key keeps working during the migration.
    assert_eq!(mint(addr, "/generate-token", TOKEN_ISSUER_KEY, USER_BODY).await.0, 200);

    // Ending the migration is a reload: the browser key stops minting at once.
    cfg.auth.allow_api_key_minting = false;
    edge.config.send_replace(Arc::new(cfg));
    eventually(Duration::from_secs(10), "API key minting turned off", || async {
        (mint(addr, "/generate-token", API_KEY, USER_BODY).await.0 == 401).then_some(())
    })
    .await;
    assert_eq!(mint(addr, "/admin/generate-token", ADMIN_API_KEY, ADMIN_BODY).await.0, 401);
    assert_eq!(mint(addr, "/generate-token", TOKEN_ISSUER_KEY, USER_BODY).await.0, 200);
}
