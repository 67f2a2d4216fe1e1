//! The SDK's examples (`client/examples/`) run against an in-process
//! standalone and do what they say. `cargo test --workspace` builds them
//! next to the test executables.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;
use std::process::Command;

use magnetar_tests::{init_logs, StandaloneSpec};

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo test --workspace` (or `cargo build -p magnetar-client --examples`)",
        path.display()
    );
    path
}

async fn run(name: &str, args: &[&str]) -> String {
    let path = example(name);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new(path).args(args).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_runs_and_does_what_it_says() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let url = s.service_url();

    let out = run("produce", &[&url, "orders", "250"]).await;
    assert!(out.contains("sent 250 messages to orders"), "{out}");
    let out = run("consume_stream", &[&url, "orders", "250"]).await;
    assert!(out.contains("received 250 messages from orders"), "{out}");
    assert!(out.contains("key=Some(\"customer-0\") order 0"), "{out}");
    let out = run("reader_replay", &[&url, "orders"]).await;
    assert!(out.contains("replayed 250 messages of orders"), "{out}");

    let out = run("key_shared_workers", &[&url, "work", "300"]).await;
    assert!(out.contains("handled 300 of 300"), "{out}");
    assert_eq!(out.matches("each key in order").count(), 3, "{out}");

    let out = run("typed_json", &[&url, "typed", "7"]).await;
    assert!(out.contains("read 7 orders"), "{out}");
    assert!(out.contains("order Some(6): Some(\"item-6\")"), "{out}");

    let r = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/admin/v2/persistent/public/default/parts/partitions",
            spec.http_port
        ))
        .header("content-type", "application/json")
        .body("4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let out = run("partitioned", &[&url, "persistent://public/default/parts"]).await;
    assert!(out.contains("has 4 partitions"), "{out}");
    let per: usize = out
        .split("messages per partition: ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<usize>().ok())
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|kv| kv.get(1).copied().unwrap_or(0))
        .sum();
    assert_eq!(per, 40, "{out}");
    s.shutdown().await;
}
