//! Driving the notes API over HTTP: saving many notes, listing them all, checking that
//! each accepted note is stored once.

use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Saves `count` notes through `base`, `concurrency` at a time; the ids accepted (202).
pub async fn save_all(base: &str, count: usize, concurrency: usize) -> Vec<String> {
    let client = ::reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, base, next) = (client.clone(), base.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return accepted;
                }
                let response = client
                    .post(format!("{base}/save"))
                    .body(format!(r#"{{"content":"note {n}"}}"#))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202, "save {n}");
                let body: Value = response.json().await.unwrap();
                accepted.push(body["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    accepted
}

/// Every note `GET /` lists, page by page, newest first.
pub async fn list_all(base: &str) -> Vec<String> {
    let client = ::reqwest::Client::new();
    let mut listed = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{base}/?limit=1000");
        if let Some(before) = &before {
            url.push_str(&format!("&before={before}"));
        }
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        let ids: Vec<String> = page["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|note| note["id"].as_str().unwrap().to_owned())
            .collect();
        let Some(last) = ids.last().cloned() else {
            return listed;
        };
        listed.extend(ids);
        before = Some(last);
    }
}

/// Waits until `GET /` at `base` lists `expected` notes; what it listed.
pub async fn until_all_listed(base: &str, expected: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let listed = list_all(base).await;
        if listed.len() >= expected || Instant::now() > deadline {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn assert_each_once(accepted: &[String], stored: &[String]) {
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "a note is stored twice");
    let accepted: HashSet<&String> = accepted.iter().collect();
    let missing = accepted.difference(&unique).count();
    assert_eq!(missing, 0, "{missing} accepted notes were lost");
    assert_eq!(
        unique.len(),
        accepted.len(),
        "notes nobody saved were stored"
    );
}
