//! The control API's request reader, as the API thread feeds it: the bytes a
//! client sent so far, growing; a complete request's body then becomes a plan.

use cevm::api::http::{parse, Parsed};
use cevm::api::{CheckpointRequest, MigrateRequest};
use cevm::plan::{CheckpointPlan, MigrationPlan};

/// Inputs up to this length are also checked prefix by prefix (quadratic).
const PREFIX_CHECK: usize = 4096;

/// Parses `data` as a client's bytes. Beyond "no panic", two properties: an
/// answer never depends on bytes after the request (a complete request parses
/// the same with anything appended), and no prefix of a complete request is
/// refused (the server parses again after every read, so a refusal of a
/// prefix would refuse a good request that arrived in pieces).
pub fn request(data: &[u8]) {
    let Ok(Parsed::Complete(req)) = parse(data) else { return };
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    assert_eq!(parse(&longer), Ok(Parsed::Complete(req.clone())), "trailing bytes changed the request");
    if data.len() <= PREFIX_CHECK {
        for k in 0..data.len() {
            if let Err(e) = parse(&data[..k]) {
                panic!("a prefix of {k} bytes of a complete request is refused: {e}");
            }
        }
    }
    match req.path.as_str() {
        "/v1/checkpoint" => {
            if let Ok(c) = serde_json::from_slice::<CheckpointRequest>(&req.body) {
                let _ = CheckpointPlan::try_from(c);
            }
        }
        "/v1/migrate" => {
            if let Ok(m) = serde_json::from_slice::<MigrateRequest>(&req.body) {
                let _ = MigrationPlan::try_from(m);
            }
        }
        _ => {}
    }
}
