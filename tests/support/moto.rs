//! moto's S3 server (from PyPI) with an empty bucket, started on a free port (shared by the
//! remote-cache and dora-executor tests).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "newt-team";

pub struct Moto {
    child: Child,
    pub endpoint: String,
    pythonpath: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pythonpath() -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Ok(p) = std::env::var("NEWT_MOTO_PATH") {
        parts.push(p);
    }
    if let Ok(p) = std::env::var("PYTHONPATH") {
        parts.push(p);
    }
    parts.join(":")
}

/// moto's S3 server with an empty bucket, or None when moto is not installed (a failure when
/// NEWT_REQUIRE_S3 is set).
pub fn moto() -> Option<Moto> {
    let pythonpath = pythonpath();
    let ok = Command::new("python3")
        .args(["-c", "import moto.server, boto3, flask, flask_cors"])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("NEWT_REQUIRE_S3").is_some() {
            panic!("NEWT_REQUIRE_S3 is set but python3 cannot import moto.server, boto3, flask, flask_cors");
        }
        eprintln!("skipping: python3 cannot import moto (pip install 'moto[s3]' flask flask-cors)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .env("PYTHONPATH", &pythonpath)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}"), pythonpath };
    let t0 = Instant::now();
    // Creating the bucket is also the readiness check.
    loop {
        if let Ok(status) = http_put(port, &format!("/{BUCKET}")) {
            assert_eq!(status, 200, "creating the bucket");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(moto)
}

fn http_put(port: u16, path: &str) -> std::io::Result<u16> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    write!(c, "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)?;
    Ok(resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}

impl Moto {
    /// Runs boto3 against the bucket (the test's hand on the server, as another client).
    pub fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', \
             aws_secret_access_key='testing', region_name='us-east-1')\nB = '{BUCKET}'\n{code}",
            self.endpoint
        );
        let out = Command::new("python3").args(["-c", &script]).env("PYTHONPATH", &self.pythonpath).output().unwrap();
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
