//! The OpenAPI description of the control API (docs/api/openapi.json) and the
//! server agree: it lists exactly the server's routes, and a real VMM answers
//! each of them with a status code it lists and a body valid against the
//! schema it gives for that code.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use cevm::api::server::ROUTES;
use cevm_testkit::*;
use serde_json::{json, Value};

fn spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The (METHOD, path) pairs the description lists.
fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn the_description_lists_exactly_the_routes_the_server_serves() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|r| (r.method.into(), r.path.into())).collect();
    assert_eq!(spec_routes(&spec), served);
}

/// What is wrong with `body` by the description's schema `name` (resolved
/// within the whole document, so that its `$ref`s resolve).
fn schema_errors(spec: &Value, name: &str, body: &Value) -> Vec<String> {
    let mut schema = spec.clone();
    schema["$ref"] = json!(format!("#/components/schemas/{name}"));
    let validator = jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("schema {name}: {e}"));
    validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

#[test]
fn the_schemas_refuse_what_the_server_must_not_send() {
    let spec = spec();
    let guest = json!({ "boot": { "kind": "builtin", "guest": "hello", "args": "" }, "mem_size": 16777216, "vcpus": 1, "memory_backend": "shared", "disk": null });
    let ok = json!({ "api_version": 1, "state": "running", "guest": guest, "checkpoints": 0 });
    assert_eq!(schema_errors(&spec, "Status", &ok), Vec::<String>::new());
    let mut missing = ok.clone();
    missing.as_object_mut().unwrap().remove("guest");
    let mut extra = ok.clone();
    extra["surprise"] = json!(1);
    let mut bad_state = ok.clone();
    bad_state["state"] = json!("dancing");
    let mut bad_boot = ok.clone();
    bad_boot["guest"]["boot"]["kind"] = json!("floppy");
    let nic = json!({ "tap": "tap0", "mac": "52:54:00:12:34:56", "rx_frames": 1, "rx_bytes": 60, "tx_frames": 0, "tx_bytes": 0, "dropped": 0 });
    let mut with_nic = ok.clone();
    with_nic["nics"] = json!([nic]);
    with_nic["guest"]["nics"] = json!([{ "tap": "tap0", "mac": "52:54:00:12:34:56" }]);
    assert_eq!(schema_errors(&spec, "Status", &with_nic), Vec::<String>::new());
    let mut bad_mac = with_nic.clone();
    bad_mac["nics"][0]["mac"] = json!("52-54-00-12-34-56");
    let mut no_counters = with_nic.clone();
    no_counters["nics"][0].as_object_mut().unwrap().remove("dropped");
    for bad in [missing, extra, bad_state, bad_boot, bad_mac, no_counters] {
        assert!(!schema_errors(&spec, "Status", &bad).is_empty(), "{bad} must not validate");
    }
    assert!(!schema_errors(&spec, "Error", &json!({ "message": "x" })).is_empty());
}

/// Checks one answer against the description: its code is listed for the
/// operation, and its body is valid against that code's schema.
struct Checker {
    spec: Value,
    exercised: HashSet<(String, String)>,
}

impl Checker {
    fn check(&mut self, method: &str, path: &str, code: u16, body: &Value) {
        let op = &self.spec["paths"][path][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is not in the description");
        let answer = &op["responses"][code.to_string()];
        assert!(answer.is_object(), "{method} {path} answered {code}, which the description does not list: {body}");
        let reference = answer["content"]["application/json"]["schema"]["$ref"].as_str().unwrap();
        let name = reference.strip_prefix("#/components/schemas/").unwrap();
        let errors = schema_errors(&self.spec, name, body);
        assert!(errors.is_empty(), "{method} {path} {code}: {body}\ndoes not match the description: {errors:#?}");
        if (200..300).contains(&code) {
            self.exercised.insert((method.into(), path.into()));
        }
    }

    /// Sends a request, checks the answer, returns it.
    fn call(&mut self, sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (code, value) = send(sock, method, path, body);
        self.check(method, path, code, &value);
        (code, value)
    }

    /// Asks `GET /v1/checkpoint/barrier` until the state is `want`.
    fn wait_barrier(&mut self, sock: &Path, want: &str) -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let (code, v) = self.call(sock, "GET", "/v1/checkpoint/barrier", None);
            if code == 200 && v["state"] == want {
                return v;
            }
            assert!(t0.elapsed() < T, "never {want}: {v}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Sends a request; its status code and JSON body.
fn send(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, text) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{answer:?}"));
    assert!(head.contains("\r\nContent-Type: application/json\r\n"), "{head}");
    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text:?}"));
    (code, value)
}

/// A checkpoint held for a group cut (`out` in `dir`), asked on a thread of
/// its own: it is answered only once the cut is over.
fn held_checkpoint(sock: &Path, out: &Path) -> std::thread::JoinHandle<(u16, Value)> {
    let (sock, req) = (sock.to_path_buf(), json!({ "out": out, "strategy": "cevm", "group_cut": true }));
    std::thread::spawn(move || send(&sock, "PUT", "/v1/checkpoint", Some(req)))
}

#[test]
fn every_route_answers_as_the_description_says() {
    let dir = workdir("openapi");
    let sock = dir.join("api.sock");
    let mut c = Checker { spec: spec(), exercised: HashSet::new() };
    // With a NIC, so that the status and the configuration show one.
    let mut br = cevm_testkit::net::Bridge::new();
    let tap = br.tap(0);
    let net = format!("tap={tap}");
    let args = ["run", "--guest", "dirtier", "--guest-args", "mib=4 fill=1 idle=1", "--mem", "32M", "--net", &net];
    let mut vm =
        cevm::child::CevmChild::spawn(bin(), &[&args[..], &["--api-sock", sock.to_str().unwrap()]].concat(), None)
            .unwrap();
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).expect("the guest never filled its memory");
    assert_eq!(c.call(&sock, "GET", "/v1/migration", None).0, 404);
    assert_eq!(c.call(&sock, "GET", "/v1/checkpoint", None).0, 404);
    assert_eq!(c.call(&sock, "GET", "/v1/status", None).0, 200);
    assert_eq!(c.call(&sock, "PUT", "/v1/pause", None).1["state"], "paused");
    assert_eq!(c.call(&sock, "PUT", "/v1/resume", None).1["state"], "running");
    let ck = dir.join("ck");
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint", Some(json!({ "out": ck }))).0, 200);
    let cevm = json!({ "out": dir.join("ck2"), "strategy": "cevm", "writer_cpus": [0] });
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint", Some(cevm)).0, 200);
    assert_eq!(c.call(&sock, "GET", "/v1/checkpoint", None).1["phase"], "done");
    // A checkpoint held for a group cut, driven as a group's coordinator
    // drives it: ready, cut, switched, go; then one aborted while ready.
    assert_eq!(c.call(&sock, "GET", "/v1/checkpoint/barrier", None).0, 404);
    let held = held_checkpoint(&sock, &dir.join("ck3"));
    assert_eq!(c.wait_barrier(&sock, "ready")["out"], json!(dir.join("ck3")));
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint/go", None).0, 409, "no go before the switch");
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint/cut", None).0, 200);
    c.wait_barrier(&sock, "switched");
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint/go", None).1["state"], "released");
    let (code, body) = held.join().unwrap();
    c.check("PUT", "/v1/checkpoint", code, &body);
    assert_eq!(code, 200, "{body}");
    let held = held_checkpoint(&sock, &dir.join("ck4"));
    c.wait_barrier(&sock, "ready");
    assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint/abort", None).1["state"], "aborted");
    let (code, body) = held.join().unwrap();
    c.check("PUT", "/v1/checkpoint", code, &body);
    assert_eq!((code, &body["guest"]), (500, &json!("here")), "an aborted cut leaves the guest where it was: {body}");
    assert!(!dir.join("ck4").exists());
    for bad in [json!({ "out": "relative" }), json!({ "out": dir.join("no/ck") }), json!({ "oops": 1 })] {
        assert_eq!(c.call(&sock, "PUT", "/v1/checkpoint", Some(bad)).0, 400);
    }
    assert_eq!(c.call(&sock, "PUT", "/v1/migrate", Some(json!({ "to": "ftp:x" }))).0, 400);
    let local = json!({ "to": "local", "params": { "max_downtime_ms": 5.0 } });
    assert_eq!(c.call(&sock, "PUT", "/v1/migrate", Some(local)).0, 200);
    assert_eq!(c.call(&sock, "GET", "/v1/migration", None).1["phase"], "done");
    let status = c.call(&sock, "GET", "/v1/status", None).1;
    assert_eq!(status["checkpoints"], 3, "{status}");
    assert_eq!(status["nics"][0]["tap"], tap.as_str(), "{status}");
    assert_eq!(status["guest"]["nics"][0]["tap"], tap.as_str(), "{status}");
    // Outside the routes: 404 and 405, with the error body of every refusal.
    for (method, path, code) in [("GET", "/v2/status", 404), ("DELETE", "/v1/status", 405), ("GET", "/v1/quit", 405)] {
        let mut s = UnixStream::connect(&sock).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with(&format!("HTTP/1.1 {code} ")), "{method} {path}: {answer}");
        let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(schema_errors(&c.spec, "Error", &body), Vec::<String>::new(), "{body}");
    }
    assert_eq!(c.call(&sock, "PUT", "/v1/quit", None).0, 200);
    assert!(vm.finish(T).expect("the VMM did not end").success());
    let all: HashSet<(String, String)> = ROUTES.iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    assert_eq!(c.exercised, all, "every route must have been answered with success once");
    let _ = std::fs::remove_dir_all(&dir);
}
