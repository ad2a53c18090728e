//! The etcd client (`cluster::etcd`) against a real etcd (`/usr/bin/etcd`, started by the
//! test on free loopback ports): put/get/range/delete, leases (keep-alive, revoke, loss),
//! watches from a revision, and the errors of an etcd that is not there.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unimodel::cluster::etcd::{EtcdClient, EtcdError, WatchEvent};

const START_DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A real etcd in a temporary directory; killed and removed on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        let (port, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("unimodel-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "test", "--log-level", "warn", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (scripts/test.sh installs it from Debian)");
        Etcd { child, dir, url }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client of `etcd`, once etcd answers (a start-up wait with a deadline).
async fn connected(etcd: &Etcd) -> EtcdClient {
    let client = EtcdClient::from_list(&etcd.url).expect("a valid URL");
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        match client.get("/probe").await {
            Ok(_) => return client,
            Err(e) if Instant::now() > deadline => panic!("etcd did not answer in time: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn kv_lease_and_watch_against_a_real_etcd() {
    let etcd = Etcd::start("kv");
    let client = connected(&etcd).await;

    // Put, get, range by prefix (keys outside the prefix stay out).
    client.put("/t/a/1", b"one".to_vec(), 0).await.unwrap();
    client.put("/t/a/2", b"two".to_vec(), 0).await.unwrap();
    client.put("/t/b", b"other".to_vec(), 0).await.unwrap();
    assert_eq!(client.get("/t/a/1").await.unwrap().unwrap().value, b"one");
    assert_eq!(client.get("/t/none").await.unwrap(), None);
    let snapshot = client.get_prefix("/t/a/").await.unwrap();
    let keys: Vec<_> = snapshot.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["/t/a/1", "/t/a/2"]);
    assert!(snapshot.revision > 0);

    // A watch from the read's revision + 1 sees exactly the changes after it, in order.
    let mut watch = client
        .watch_prefix("/t/a/", snapshot.revision + 1)
        .await
        .unwrap();
    client.put("/t/b", b"ignored".to_vec(), 0).await.unwrap();
    client.put("/t/a/3", b"three".to_vec(), 0).await.unwrap();
    assert_eq!(client.delete("/t/a/1").await.unwrap(), 1);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap();
        seen.extend(batch.events);
    }
    assert!(matches!(&seen[0], WatchEvent::Put(e) if e.key == "/t/a/3" && e.value == b"three"));
    assert!(matches!(&seen[1], WatchEvent::Delete { key, .. } if key == "/t/a/1"));

    // A lease: keys attached to it vanish when it is revoked, and the watch says so.
    let lease = client.lease_grant(5).await.unwrap();
    assert_eq!(lease.ttl_s, 5);
    client
        .put("/t/a/leased", b"x".to_vec(), lease.id)
        .await
        .unwrap();
    assert_eq!(
        client.get("/t/a/leased").await.unwrap().unwrap().lease,
        lease.id
    );
    let (mut keep_alive, ttl) = client.lease_keep_alive(lease.id).await.unwrap();
    assert_eq!(ttl, 5);
    assert_eq!(keep_alive.keep_alive().await.unwrap(), 5);
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(&batch.events[0], WatchEvent::Put(e) if e.key == "/t/a/leased"));
    client.lease_revoke(lease.id).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(&batch.events[0], WatchEvent::Delete { key, .. } if key == "/t/a/leased"));
    assert_eq!(client.get("/t/a/leased").await.unwrap(), None);
    // Renewing a revoked lease says it is lost (the node then grants a new one).
    assert!(matches!(
        keep_alive.keep_alive().await,
        Err(EtcdError::LeaseLost { .. })
    ));
    assert!(matches!(
        client.lease_keep_alive(lease.id).await,
        Err(EtcdError::LeaseLost { .. })
    ));

    // delete_prefix removes the rest.
    assert_eq!(client.delete_prefix("/t/").await.unwrap(), 3);
    assert!(client.get_prefix("/t/").await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn a_lease_left_alone_expires_and_takes_its_keys() {
    let etcd = Etcd::start("expiry");
    let client = connected(&etcd).await;
    let snapshot = client.get_prefix("/e/").await.unwrap();
    let mut watch = client
        .watch_prefix("/e/", snapshot.revision + 1)
        .await
        .unwrap();
    let lease = client.lease_grant(1).await.unwrap();
    client.put("/e/k", b"v".to_vec(), lease.id).await.unwrap();
    // etcd expires a lease within about its TTL (plus its own checking interval).
    let mut deleted = false;
    while !deleted {
        let batch = tokio::time::timeout(Duration::from_secs(15), watch.next())
            .await
            .unwrap()
            .unwrap();
        deleted = batch
            .events
            .iter()
            .any(|e| matches!(e, WatchEvent::Delete { key, .. } if key == "/e/k"));
    }
    assert!(matches!(
        client.lease_keep_alive(lease.id).await,
        Err(EtcdError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn a_watch_ends_with_an_error_when_etcd_goes_away() {
    let mut etcd = Etcd::start("gone");
    let client = connected(&etcd).await;
    let mut watch = client.watch_prefix("/g/", 0).await.unwrap();
    let lease = client.lease_grant(10).await.unwrap();
    let (mut keep_alive, _) = client.lease_keep_alive(lease.id).await.unwrap();
    etcd.child.kill().unwrap();
    etcd.child.wait().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    let renewed = tokio::time::timeout(Duration::from_secs(20), keep_alive.keep_alive())
        .await
        .unwrap();
    assert!(renewed.is_err(), "{renewed:?}");
    // New calls fail fast and say which operation could not reach etcd.
    let err = tokio::time::timeout(Duration::from_secs(20), client.put("/g/x", vec![], 0))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().starts_with("etcd put failed"), "{err}");
}

#[tokio::test]
async fn an_etcd_that_is_not_there_fails_calls_not_the_client() {
    // Nothing listens on this port: the client is made (lazily), each call fails clearly.
    let url = format!("http://127.0.0.1:{}", free_port());
    let client = EtcdClient::from_list(&format!("{url},{url}")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), client.lease_grant(5))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EtcdError::Rpc {
                op: "lease grant",
                ..
            }
        ),
        "{err}"
    );
}
