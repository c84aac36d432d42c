//! The agent's `/metrics` as Prometheus sees it (issue 12): the agent as a real process
//! (userspace backend) with a real wireguard-go client and traffic through the tunnel,
//! scraped every second by Debian's `prometheus` (the real binary, its own configuration,
//! storage and port, in the gateway namespace, killed by pid). Checked through its HTTP
//! API after the scrapes:
//!
//! - the target is up;
//! - `promtool check metrics` accepts the agent's page;
//! - the per-peer counters (`wireguard_peer_{receive,transmit}_bytes_total`) of the
//!   client grew while the traffic ran, and once it stopped they equal what
//!   `wg show <if> transfer` says exactly (read before and after the query: a moment
//!   when the kernel's counters stood still and Prometheus had scraped that value), the
//!   agent's own totals (`gatehouse_peer_*_bytes_total`) and the handshake time likewise;
//! - the info metrics carry the device, the peer's endpoint and allowed IPs;
//! - every metric the Grafana dashboard (`packaging/grafana/gatehouse.json`) charts is
//!   among the names Prometheus has, and every expression of the dashboard is valid
//!   PromQL that Prometheus evaluates.
//!
//! Every check runs and the test reports all that failed at once.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_prometheus` (about 15 s).

#[path = "e2e/mod.rs"]
mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::netns::ChildGuard;
use e2e::{cmd_ok, eventually, Site, CLIENT_PORT, CLIENT_TUNNEL, CLIENT_UNDERLAY};
use serde_json::Value;

/// Prometheus's scrape interval; also how often the agent reads its peers (1 s default).
const SCRAPE: Duration = Duration::from_secs(1);
/// The scrape job's name.
const JOB: &str = "gatehouse";
/// How long a check waits for Prometheus or a stable counter.
const WITHIN: Duration = Duration::from_secs(30);
/// The dashboard whose metric names and expressions are checked.
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/grafana/gatehouse.json"
);

/// Metric names the dashboard may use that a normal run does not produce, with the reason.
/// (Empty: every metric the dashboard charts exists from the agent's start.)
const DASHBOARD_EXCEPTIONS: &[(&str, &str)] = &[];

#[test]
#[ignore = "root + wireguard-go + prometheus: tests/netns/run-root-tests.sh e2e_prometheus"]
fn prometheus_scrapes_the_agent() {
    e2e::run("pm", async |mut site: Site| {
        let name = format!("loc-{}", site.tag);
        site.create_location(Site::default_location(&name)).await;
        site.add_client(e2e::ClientOptions::default()).await;
        site.start_agent().await;
        site.wait_synced().await;
        site.wait_ping().await;
        let mut checks = Checks::default();

        // promtool on the page as the agent serves it.
        let page = site_get(&site, "/metrics").await;
        promtool_check(&page, &mut checks);

        let prom = Prometheus::start(&site).await;
        eventually("the first scrape", WITHIN, || async {
            prom.scalar(&format!("up{{job=\"{JOB}\"}}")).await
        })
        .await;
        let up = prom.scalar(&format!("up{{job=\"{JOB}\"}}")).await;
        if up != Some(1.0) {
            panic!(
                "the target is not up (up = {up:?}): {}",
                prom.target_error().await
            );
        }

        // Traffic while Prometheus scrapes: at least two scrapes during the pings (5 s).
        let scrapes = format!("count_over_time(up{{job=\"{JOB}\"}}[1m])");
        let before = prom.scalar(&scrapes).await.unwrap_or(0.0);
        let start = Instant::now();
        let pinger = site.start_pinger(25, "0.2");
        eventually("two scrapes during the traffic", WITHIN, || async {
            let n = prom.scalar(&scrapes).await?;
            (n >= before + 2.0).then_some(())
        })
        .await;
        let pings = pinger.finish().await;
        assert!(pings.received > 0, "no ping answered: {pings:?}");
        let traffic = start.elapsed();
        let up = prom.scalar(&format!("up{{job=\"{JOB}\"}}")).await;
        assert_eq!(up, Some(1.0), "up: {}", prom.target_error().await);
        let status = site.status().await;

        let key = site.client().public_key.clone();
        per_peer_counters(&site, &prom, &key, traffic, &mut checks).await;
        info_metrics(&site, &prom, &key, &status, &mut checks).await;
        dashboard(&prom, &mut checks).await;

        checks.finish();
    });
}

// ------------------------------------------------------------------ the checks --

/// The client's counters in Prometheus: present once, grew during the traffic, and equal
/// to `wg show` at a moment the kernel's counters stood still.
async fn per_peer_counters(
    site: &Site,
    prom: &Prometheus,
    key: &str,
    traffic: Duration,
    checks: &mut Checks,
) {
    let rx = format!("wireguard_peer_receive_bytes_total{{public_key=\"{key}\"}}");
    let tx = format!("wireguard_peer_transmit_bytes_total{{public_key=\"{key}\"}}");
    for q in [&rx, &tx] {
        match prom.vector(q).await {
            Ok(v) if v.len() == 1 => {}
            Ok(v) => {
                checks.fail(format!("{q}: {} series, want 1: {v:?}", v.len()));
                return;
            }
            Err(e) => {
                checks.fail(format!("{q}: {e}"));
                return;
            }
        }
    }

    // Grew while the pings ran: the samples of the traffic's window never go down and
    // the last is above the first.
    let window = traffic.as_secs() + 2;
    for q in [&rx, &tx] {
        let samples = prom.range(&format!("{q}[{window}s]")).await;
        match samples {
            Ok(s)
                if s.len() >= 2 && s.windows(2).all(|w| w[0] <= w[1]) && s[0] < s[s.len() - 1] => {}
            other => checks.fail(format!(
                "{q} did not grow over the {window} s of traffic: {other:?}"
            )),
        }
    }

    // Equal to the kernel's counters: wg before, Prometheus, wg after, all the same.
    let mut last = String::new();
    let deadline = Instant::now() + WITHIN;
    let matched = loop {
        let before = wg_transfer(site, key).await;
        let got = (prom.scalar(&rx).await, prom.scalar(&tx).await);
        let after = wg_transfer(site, key).await;
        let want = (Some(before.0 as f64), Some(before.1 as f64));
        if before == after && got == want {
            break Some(before);
        }
        last = format!("wg show transfer {before:?} then {after:?}, Prometheus (rx, tx) {got:?}");
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(SCRAPE / 4).await;
    };
    let Some((wg_rx, wg_tx)) = matched else {
        checks.fail(format!(
            "Prometheus's wireguard_peer_*_bytes_total never equalled `wg show transfer` \
             within {WITHIN:?} of the traffic's end; last: {last}"
        ));
        return;
    };
    eprintln!("counters: wg show and Prometheus agree on rx {wg_rx}, tx {wg_tx}");
    if wg_rx == 0 || wg_tx == 0 || wg_rx == wg_tx {
        // Handshake messages differ in size (148 and 92 bytes), so with traffic the two
        // directions never carry the same number of bytes: a swap would show.
        checks.fail(format!(
            "the kernel's counters cannot tell rx from tx: rx {wg_rx}, tx {wg_tx}"
        ));
    }

    // The agent's totals across counter resets: no reset here, so the kernel's counters.
    let totals = (
        format!("gatehouse_peer_receive_bytes_total{{public_key=\"{key}\"}}"),
        format!("gatehouse_peer_transmit_bytes_total{{public_key=\"{key}\"}}"),
    );
    if let Err(e) = stable_equal(site, prom, key, &totals, Field::Transfer).await {
        checks.fail(format!("gatehouse_peer_*_bytes_total: {e}"));
    }

    // The handshake time: unix seconds, as `wg show latest-handshakes`.
    let handshake = format!("wireguard_peer_last_handshake_seconds{{public_key=\"{key}\"}}");
    let pair = (handshake.clone(), handshake);
    if let Err(e) = stable_equal(site, prom, key, &pair, Field::Handshake).await {
        checks.fail(format!("wireguard_peer_last_handshake_seconds: {e}"));
    }
}

/// What [`stable_equal`] compares.
#[derive(Clone, Copy)]
enum Field {
    /// (rx, tx) of `wg show transfer`.
    Transfer,
    /// (handshake, handshake) of `wg show latest-handshakes`.
    Handshake,
}

/// Waits until the two queries answer what `wg` says before and after them.
async fn stable_equal(
    site: &Site,
    prom: &Prometheus,
    key: &str,
    (a, b): &(String, String),
    field: Field,
) -> Result<(), String> {
    let read = async || match field {
        Field::Transfer => wg_transfer(site, key).await,
        Field::Handshake => {
            let h = wg_handshake(site, key).await;
            (h, h)
        }
    };
    let deadline = Instant::now() + WITHIN;
    loop {
        let before = read().await;
        let got = (prom.scalar(a).await, prom.scalar(b).await);
        let after = read().await;
        if before == after && got == (Some(before.0 as f64), Some(before.1 as f64)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not equal to wg within {WITHIN:?}: wg {before:?} then {after:?}, \
                 Prometheus {got:?} ({a}, {b})"
            ));
        }
        tokio::time::sleep(SCRAPE / 4).await;
    }
}

/// The info metrics and the labels every metric of the agent carries.
async fn info_metrics(
    site: &Site,
    prom: &Prometheus,
    key: &str,
    status: &gatehouse::agent::status::Status,
    checks: &mut Checks,
) {
    let iface = site.interface().to_string();
    let endpoint = format!("{CLIENT_UNDERLAY}:{CLIENT_PORT}");
    let allowed = format!("{CLIENT_TUNNEL}/32");
    let location_key = site.location().public_key.clone();
    let wanted: [(String, Vec<(&str, &str)>); 4] = [
        (
            format!("gatehouse_info{{job=\"{JOB}\"}} == 1"),
            vec![
                ("interface", iface.as_str()),
                ("backend", "userspace"),
                ("version", status.version.as_str()),
            ],
        ),
        (
            format!("wireguard_device_info{{device=\"{iface}\"}} == 1"),
            vec![("public_key", location_key.as_str())],
        ),
        (
            format!("wireguard_peer_info{{public_key=\"{key}\"}} == 1"),
            vec![("device", iface.as_str()), ("endpoint", endpoint.as_str())],
        ),
        (
            format!("wireguard_peer_allowed_ips_info{{public_key=\"{key}\"}} == 1"),
            vec![
                ("device", iface.as_str()),
                ("allowed_ips", allowed.as_str()),
            ],
        ),
    ];
    for (q, want) in &wanted {
        let series = match prom.vector(q).await {
            Ok(v) if v.len() == 1 => labels(&v[0]),
            Ok(v) => {
                checks.fail(format!("{q}: {} series, want 1: {v:?}", v.len()));
                continue;
            }
            Err(e) => {
                checks.fail(format!("{q}: {e}"));
                continue;
            }
        };
        for (name, value) in want {
            if series.get(*name).map(String::as_str) != Some(*value) {
                checks.fail(format!(
                    "{q}: label {name}={value:?} wanted, got {series:?}"
                ));
            }
        }
    }

    // location and gateway: on every series of the agent, naming this gateway and its
    // location (by name or id).
    let q = format!("{{job=\"{JOB}\",__name__=~\"gatehouse_.+|wireguard_.+\"}}");
    let series = match prom.vector(&q).await {
        Ok(s) => s,
        Err(e) => {
            checks.fail(format!("the agent's series: {e}"));
            return;
        }
    };
    let accepted = [
        (
            "location",
            [status.location.clone(), site.location().id.to_string()],
        ),
        ("gateway", [status.name.clone(), status.gateway_id.clone()]),
    ];
    let mut values: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut wrong: BTreeSet<String> = BTreeSet::new();
    for s in &series {
        let l = labels(s);
        for (label, ok) in &accepted {
            match l.get(*label) {
                Some(v) if ok.contains(v) => {
                    values.entry(label).or_default().insert(v.clone());
                }
                other => {
                    wrong.insert(format!(
                        "{} has {label}={other:?}, want one of {ok:?}",
                        l.get("__name__").map_or("?", String::as_str)
                    ));
                }
            }
        }
    }
    if !wrong.is_empty() {
        let wrong: Vec<String> = wrong.into_iter().collect();
        checks.fail(format!(
            "series without this location's or gateway's label: {}",
            wrong.join("; ")
        ));
    }
    for (label, v) in values.iter().filter(|(_, v)| v.len() > 1) {
        checks.fail(format!(
            "{label} has several values across the agent's series: {v:?}"
        ));
    }
}

/// Every metric name of the dashboard is among Prometheus's names; every expression of
/// the dashboard is valid and evaluates.
async fn dashboard(prom: &Prometheus, checks: &mut Checks) {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let exprs = dashboard_exprs(&json);
    assert!(
        exprs.len() >= 10,
        "few expressions in {DASHBOARD}: {exprs:?}"
    );
    let names: BTreeSet<String> = match prom.get("/api/v1/label/__name__/values", &[]).await {
        Ok(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        other => panic!("/api/v1/label/__name__/values: {other:?}"),
    };
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !names.contains(*n))
        .filter(|n| !DASHBOARD_EXCEPTIONS.iter().any(|(x, _)| x == n))
        .collect();
    eprintln!(
        "dashboard: {} expressions, {} metric names, {} missing",
        exprs.len(),
        used.len(),
        missing.len()
    );
    if !missing.is_empty() {
        checks.fail(format!(
            "metrics the dashboard uses that Prometheus does not have: {missing:?}"
        ));
    }
    let mut empty = vec![];
    for e in &exprs {
        let q = grafana_to_promql(e);
        match prom.get("/api/v1/query", &[("query", &q)]).await {
            Ok(data) => {
                if data["result"].as_array().is_some_and(Vec::is_empty) {
                    empty.push(q);
                }
            }
            Err(err) => checks.fail(format!("dashboard expression {e:?}: {err}")),
        }
    }
    if !empty.is_empty() {
        eprintln!("dashboard expressions with no series in this run (informative):");
        for q in empty {
            eprintln!("  {q}");
        }
    }
}

/// `promtool check metrics` on `page`; its output is printed, its exit status decides.
fn promtool_check(page: &str, checks: &mut Checks) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "promtool check metrics ({}, {} lines of metrics):\n{}",
        out.status,
        page.lines().count(),
        text.trim_end()
    );
    if !out.status.success() {
        checks.fail(format!(
            "promtool check metrics refused the page ({}): {}",
            out.status,
            text.trim_end()
        ));
    }
}

// ------------------------------------------------------------------ helpers --

/// Failures collected so that one run shows all of them.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn fail(&mut self, what: String) {
        eprintln!("CHECK FAILED: {what}");
        self.0.push(what);
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// A GET of the agent's HTTP listener; the body.
async fn site_get(site: &Site, path: &str) -> String {
    let url = format!("http://{}{path}", site.paths.http);
    let response = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.text().await.expect("body")
}

/// (rx, tx) of the peer in `wg show <if> transfer` (the gateway namespace).
async fn wg_transfer(site: &Site, key: &str) -> (u64, u64) {
    let out = cmd_ok("wg", &["show", site.interface(), "transfer"]).await;
    let fields = peer_line(&out, key);
    let n = |i: usize| fields.get(i).and_then(|s| s.parse().ok());
    match (n(1), n(2)) {
        (Some(rx), Some(tx)) => (rx, tx),
        _ => panic!("wg show transfer: no counters for {key} in {out:?}"),
    }
}

/// The peer's latest handshake (unix seconds, 0 none) in `wg show <if> latest-handshakes`.
async fn wg_handshake(site: &Site, key: &str) -> u64 {
    let out = cmd_ok("wg", &["show", site.interface(), "latest-handshakes"]).await;
    peer_line(&out, key)
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("wg show latest-handshakes: no {key} in {out:?}"))
}

fn peer_line(out: &str, key: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|f| f.first().map(String::as_str) == Some(key))
        .unwrap_or_default()
}

/// A series' labels (with `__name__` when the result keeps it).
fn labels(series: &Value) -> BTreeMap<String, String> {
    series["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every PromQL expression of the dashboard: the panels' targets (rows' nested panels
/// too) and the query variables.
fn dashboard_exprs(json: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                for child in m.values() {
                    walk(child, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out = vec![];
    walk(&json["panels"], &mut out);
    for var in json["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let q = match &var["query"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("query")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
            _ => String::new(),
        };
        // label_values(<selector>, <label>): the selector is the expression.
        if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        {
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push(selector.trim().to_string());
        } else if !q.is_empty() {
            out.push(q);
        }
    }
    out
}

/// The metric names (`gatehouse_*`, `wireguard_*`) an expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = vec![];
    let mut rest = expr;
    let mut prev_ident = false;
    while let Some(c) = rest.chars().next() {
        if !prev_ident && (rest.starts_with("gatehouse_") || rest.starts_with("wireguard_")) {
            let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = &rest[end..];
            prev_ident = true;
            continue;
        }
        prev_ident = ident(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A dashboard expression with Grafana's variables replaced, for Prometheus's API.
fn grafana_to_promql(expr: &str) -> String {
    [
        ("${location:regex}", ".*"),
        ("${gateway:regex}", ".*"),
        ("$location", ".*"),
        ("$gateway", ".*"),
        ("$__rate_interval", "1m"),
        ("$__interval", "5s"),
        ("$__range", "1m"),
    ]
    .iter()
    .fold(expr.to_string(), |e, (from, to)| e.replace(from, to))
}

// ------------------------------------------------------------------ Prometheus --

/// Debian's prometheus, started for one test in the calling thread's network namespace:
/// its configuration, storage and log in its own temporary directory, listening on a free
/// loopback port. Killed by pid (and reaped) before the directory goes.
struct Prometheus {
    child: ChildGuard,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it scraping the site's agent every [`SCRAPE`]; waits until it is ready.
    async fn start(site: &Site) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let interval = format!("{}s", SCRAPE.as_secs());
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
                 evaluation_interval: 1m\n\
                 scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{}']\n",
                site.paths.http
            ),
        )
        .expect("write prometheus.yml");
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus.log");
        let err = out.try_clone().expect("dup");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/setup.sh installs it)");
        let mut prom = Prometheus {
            child: ChildGuard(child),
            url: format!("http://{listen}"),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
            _dir: dir,
        };
        let deadline = Instant::now() + WITHIN;
        loop {
            let ready = prom
                .http
                .get(format!("{}/-/ready", prom.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            if let Ok(Some(status)) = prom.child.0.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prom.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {WITHIN:?}:\n{}",
                prom.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "prometheus (pid {}) on {} scrapes http://{}/metrics every {interval}",
            prom.child.pid(),
            prom.url,
            site.paths.http
        );
        prom
    }

    fn log_tail(&self) -> String {
        e2e::agent::tail(&self.log, 30)
    }

    /// GET an API path; `data` of a successful answer, else the error.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("{}{path}", self.url);
        let response = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{path} {query:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query's series.
    async fn vector(&self, q: &str) -> Result<Vec<Value>, String> {
        let data = self.get("/api/v1/query", &[("query", q)]).await?;
        data["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("{q}: not a vector: {data}"))
    }

    /// The value of an instant query with exactly one series; None otherwise.
    async fn scalar(&self, q: &str) -> Option<f64> {
        match self.vector(q).await.ok()?.as_slice() {
            [s] => s["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The samples of a range query (`selector[window]`) with exactly one series.
    async fn range(&self, q: &str) -> Result<Vec<f64>, String> {
        let v = self.vector(q).await?;
        let [s] = v.as_slice() else {
            return Err(format!("{q}: {} series, want 1", v.len()));
        };
        s["values"]
            .as_array()
            .ok_or_else(|| format!("{q}: no values: {s}"))?
            .iter()
            .map(|p| {
                p[1].as_str()
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| format!("{q}: bad sample {p}"))
            })
            .collect()
    }

    /// The scrape target's health and last error.
    async fn target_error(&self) -> String {
        match self.get("/api/v1/targets", &[]).await {
            Ok(data) => data["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{} {}: {}", t["scrapeUrl"], t["health"], t["lastError"]))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e,
        }
    }
}

#[test]
fn dashboard_names_are_found() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(gatehouse_apply_duration_seconds_bucket{location=~\"$location\"}[$__rate_interval])))"
        ),
        vec!["gatehouse_apply_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("time() - wireguard_peer_last_handshake_seconds > 0 and x_gatehouse_no"),
        vec!["wireguard_peer_last_handshake_seconds"]
    );
    assert_eq!(
        grafana_to_promql("rate(a{gateway=~\"$gateway\"}[$__rate_interval])"),
        "rate(a{gateway=~\".*\"}[1m])"
    );
}

#[test]
fn the_dashboard_is_valid() {
    let text = std::fs::read_to_string(DASHBOARD).expect("the dashboard");
    let json: Value = serde_json::from_str(&text).expect("JSON");
    let exprs = dashboard_exprs(&json);
    assert!(exprs.len() >= 10, "{exprs:?}");
    // Every panel queries the dashboard's Prometheus variable.
    fn panels(v: &Value, out: &mut Vec<Value>) {
        for p in v.as_array().into_iter().flatten() {
            out.push(p.clone());
            panels(&p["panels"], out);
        }
    }
    let mut all = vec![];
    panels(&json["panels"], &mut all);
    for p in all.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            p["title"]
        );
    }
    let vars: Vec<&str> = json["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["DS_PROMETHEUS", "location", "gateway"] {
        assert!(vars.contains(&v), "variable {v} in {vars:?}");
    }
}
