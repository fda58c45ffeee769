//! fluxo's signatures checked by an implementation it did not write: the
//! Standard Webhooks reference library (`standardwebhooks` on PyPI), which
//! scripts/test.sh installs into a venv of its own.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use fluxo_webhooks::{Secret, sign, signature};

fn python() -> String {
    std::env::var("FLUXO_TEST_STANDARDWEBHOOKS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "FLUXO_TEST_STANDARDWEBHOOKS_PYTHON is not set: run the suite with ./scripts/test.sh, \
             which installs the standardwebhooks package"
        )
    })
}

fn now() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    i64::try_from(secs).expect("seconds fit i64")
}

/// Runs `script` with the reference library; the body arrives on stdin.
/// Returns (success, stdout + stderr).
fn reference(script: &str, args: &[&str], body: &[u8]) -> (bool, String) {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const VERIFY: &str = r#"
import sys
from standardwebhooks.webhooks import Webhook
secret, msg_id, timestamp, signature = sys.argv[1:5]
body = sys.stdin.buffer.read()
Webhook(secret).verify(body, {
    "webhook-id": msg_id,
    "webhook-timestamp": timestamp,
    "webhook-signature": signature,
})
print("verified")
"#;

const SIGN: &str = r#"
import sys, datetime
from standardwebhooks.webhooks import Webhook
secret, msg_id, timestamp = sys.argv[1:4]
body = sys.stdin.buffer.read().decode()
at = datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.timezone.utc)
print(Webhook(secret).sign(msg_id, at, body))
"#;

#[test]
fn the_reference_library_verifies_fluxos_signatures_with_either_secret_of_a_rotation() {
    let old = Secret::generate().unwrap();
    let new = Secret::generate().unwrap();
    let body = br#"{"type":"entry.recorded","data":{"merchant_id":"m-1","amount":{"currency_code":"BRL","minor_units":"1050"}}}"#;
    let headers = sign(&[&new, &old], "evt_01JD5Q8M3S7V", now(), body);
    for secret in [&new, &old] {
        let (ok, out) = reference(
            VERIFY,
            &[&secret.expose_text(), &headers.id, &headers.timestamp, &headers.signature],
            body,
        );
        assert!(ok && out.contains("verified"), "{out}");
    }
    let stranger = Secret::generate().unwrap();
    let (ok, out) = reference(
        VERIFY,
        &[&stranger.expose_text(), &headers.id, &headers.timestamp, &headers.signature],
        body,
    );
    assert!(!ok, "a stranger's secret verified: {out}");
    let (ok, out) = reference(
        VERIFY,
        &[&new.expose_text(), &headers.id, &headers.timestamp, &headers.signature],
        b"{\"tampered\":true}",
    );
    assert!(!ok, "a changed body verified: {out}");
}

#[test]
fn fluxo_verifies_what_the_reference_library_signs() {
    let secret = Secret::generate().unwrap();
    let body = "{\"type\":\"balance.changed\"}";
    let timestamp = now();
    let (ok, out) =
        reference(SIGN, &[&secret.expose_text(), "evt_1", &timestamp.to_string()], body.as_bytes());
    assert!(ok, "{out}");
    let headers = fluxo_webhooks::SignedHeaders {
        id: "evt_1".into(),
        timestamp: timestamp.to_string(),
        signature: out.trim().to_owned(),
    };
    fluxo_webhooks::verify(&secret, &headers, body.as_bytes(), timestamp, signature::DEFAULT_TOLERANCE_SECS)
        .unwrap();
    assert_eq!(headers, sign(&[&secret], "evt_1", timestamp, body.as_bytes()));
}
