//! `dws_active_connections{kind}` stays exact under churn: sockets opening,
//! closing cleanly, vanishing, failing auth and being taken over, at once.
//! (Its own test binary: the metrics recorder is per process.)

mod support;

use std::time::Duration;

use daisi_testkit::eventually;
use daisi_testkit::ws::{WsClient, admin_token, user_token};
use support::{RunningEdge, Servers, metric};

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn active_connections_is_exact_under_churn() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let user = r#"dws_active_connections{kind="user"}"#;
    let admin = r#"dws_active_connections{kind="admin"}"#;

    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = edge.user_url("c1", "a1", &user_token("c1", "a1", &format!("u{i}"), 60));
        tasks.push(tokio::spawn(async move {
            let mut c = WsClient::connect(&url).await;
            c.expect_ready().await;
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let mut admins = Vec::new();
    for i in 0..5 {
        let mut a = WsClient::connect(&edge.admin_url(&admin_token(&format!("ad{i}"), None, None, None))).await;
        a.expect_ready().await;
        admins.push(a);
    }
    // Failed handshakes never count.
    for _ in 0..5 {
        WsClient::connect(&edge.user_url("c1", "a1", "bad")).await.expect_error_then_close("InvalidToken", 4403).await;
    }
    eventually(T, "65 sockets counted", || async {
        let m = edge.metrics().await;
        (metric(&m, user) == 60.0 && metric(&m, admin) == 5.0).then_some(())
    })
    .await;

    // 20 close cleanly, 20 vanish without a close frame, 10 are taken over.
    let mut rest = clients.split_off(20);
    let vanish: Vec<_> = rest.drain(..20).collect();
    let mut joins = Vec::new();
    for c in clients {
        joins.push(tokio::spawn(c.close()));
    }
    for j in joins {
        j.await.unwrap();
    }
    drop(vanish);
    let mut taken = Vec::new();
    for i in 40..50 {
        let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", &format!("u{i}"), 60))).await;
        c.expect_ready().await;
        taken.push(c);
    }
    drop(admins);
    // Left: 20 untouched (u40..u59, of which u40..u49 were replaced by 10 new ones).
    eventually(T, "gauges back to the live count", || async {
        let m = edge.metrics().await;
        (metric(&m, user) == 20.0 && metric(&m, admin) == 0.0).then_some(())
    })
    .await;
    drop(rest);
    drop(taken);
    eventually(T, "gauges back to zero", || async {
        let m = edge.metrics().await;
        (metric(&m, user) == 0.0 && metric(&m, admin) == 0.0).then_some(())
    })
    .await;
}
